"""``python -m jobs.dataset``: an output's kept edits (a run with a scorer) as a training set that
``datasets.load_dataset("parquet", ...)`` and pyarrow read (README, "A training set").

Submit with ``ray job submit --working-dir . -- python -m jobs.dataset --output s3://bucket/run``;
without a cluster it starts an embedded Ray.
"""

from jobs.common import DATASET_FLAGS, main
from pipeline.batch.dataset import run_dataset

if __name__ == "__main__":
    main(run_dataset, __doc__, flags=DATASET_FLAGS, prog="python -m jobs.dataset")

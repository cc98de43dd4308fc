"""``python -m jobs.tune``: Stage 1: manifest -> stored embeddings (and errors).

Submit with ``ray job submit --working-dir . -- python -m jobs.tune --config run.yaml``; without a
cluster it starts an embedded Ray.
"""

from jobs.common import main
from pipeline.batch.jobs import run_tune

if __name__ == "__main__":
    main(run_tune, __doc__, prog="python -m jobs.tune")

"""``python -m jobs.run``: Both stages in one streaming pipeline: manifest -> embeddings -> edits,
images, results.

Submit with ``ray job submit --working-dir . -- python -m jobs.run --config run.yaml``; without a
cluster it starts an embedded Ray.
"""

from jobs.common import main
from pipeline.batch.jobs import run_all

if __name__ == "__main__":
    main(run_all, __doc__, prog="python -m jobs.run")

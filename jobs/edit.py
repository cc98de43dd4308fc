"""``python -m jobs.edit``: Stage 2: stored embeddings + targets (the manifest's, or a separate
table) -> edits.

Submit with ``ray job submit --working-dir . -- python -m jobs.edit --config run.yaml``; without a
cluster it starts an embedded Ray.
"""

from jobs.common import main
from pipeline.batch.jobs import run_edit

if __name__ == "__main__":
    main(run_edit, __doc__, prog="python -m jobs.edit")

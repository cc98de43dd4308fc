"""``python -m jobs.nightly``: every manifest under a prefix (``--manifests``) that no earlier run
processed, each through jobs.run into ``{output}/{run_id}/``, then the night's report beside them.

The run id (``--run-id``) defaults to today's UTC date; running a failed night again with its run
id resumes it. On Kubernetes, deploy/kuberay/raycronjob-nightly.yaml submits it every night.
"""

from jobs.common import NIGHTLY_FLAGS, main
from pipeline.batch.nightly import run_nightly

if __name__ == "__main__":
    main(run_nightly, __doc__, flags=NIGHTLY_FLAGS, prog="python -m jobs.nightly")

"""Failpoints: a test's way to kill a process at a named point of the pipeline, for real.

Off unless ``$PTI_FAILPOINTS`` names a folder. A test arms a point by creating a file named after
it in that folder; the first process to reach the point claims the file (an atomic rename, so
exactly one process fires) and kills itself with SIGKILL: no cleanup, no exception handler runs,
as when a node dies or the OOM killer strikes. Ray's processes inherit the variable when the
cluster starts, so the test cluster sets it once for every worker.
"""

from __future__ import annotations

import os
import signal

ENV = "PTI_FAILPOINTS"


def failpoint(name: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    armed = os.path.join(folder, name)
    try:
        os.rename(armed, f"{armed}.fired-{os.getpid()}")
    except OSError:
        return  # not armed, or another process claimed it first
    os.kill(os.getpid(), signal.SIGKILL)

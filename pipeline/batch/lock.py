"""One writer per output, one night per manifest: a lease with its holder and expiry.

A lease is a folder of generation objects ``00000000.json``, ``00000001.json``, ...; the highest
one is the current lease. A taker creates the next generation only if it is absent (S3's
conditional put ``If-None-Match: *``; a hard link on local disk), so of two jobs that start
together exactly one gets it, and a lease whose holder died is taken over once it has expired by
the same single create (at once when the holder was a process of this machine that is gone).
The holder renews its generation while it runs and marks it expired when
it ends. Nothing is ever overwritten but the holder's own generation.

Why hand-written: fsspec's ``pipe_file(mode="create")`` is the conditional put we use on S3, but
neither fsspec nor pyarrow offers a lease on top of it, and on local disk fsspec's create is a
check-then-write (``exists`` then ``open``), which two processes can both pass.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PTIError
from pipeline.io.storage import Location

log = logging.getLogger(__name__)


class Busy(PTIError):
    """The lease is held by another live holder; ``holder`` is its record."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _filesystem(folder: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(folder.uri, **folder.storage_options())
    return fs, path.rstrip("/")


def create_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there; False if something was."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(staging, "wb") as f:
            f.write(data)
        try:
            os.link(staging, path)  # atomic, and fails if the name exists: the whole record or none
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(staging)
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs: PutObject with If-None-Match: *
        return True
    except FileExistsError:
        return False
    except OSError as error:  # botocore's PreconditionFailed (412), as s3fs passes it on
        if "PreconditionFailed" in str(error) or "412" in str(error):
            return False
        raise


@dataclass
class Lease:
    """A held lease: renewed every ``ttl_s / 4`` by a daemon thread until ``release``."""

    fs: fsspec.AbstractFileSystem
    path: str  # this holder's generation object
    record: dict
    ttl_s: float
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Lease":
        threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True).start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._write(time.time() + self.ttl_s)
            except Exception as error:  # a store hiccup: the next renewal tries again
                log.warning("could not renew the lease %s: %s", self.path, error)

    def _write(self, expires: float) -> None:
        self.record = {**self.record, "expires": expires}
        self.fs.pipe_file(self.path, json.dumps(self.record).encode())

    def release(self) -> None:
        """Stop renewing and mark this generation expired: the next taker need not wait."""
        self._stop.set()
        try:
            self._write(0.0)
        except Exception as error:  # it expires on its own after ttl_s
            log.warning("could not release the lease %s (it expires on its own): %s", self.path, error)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _generations(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    try:
        names = [posixpath.basename(p) for p in fs.ls(folder, detail=False, refresh=True)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and n[:-5].isdigit())


def _died_here(record: dict) -> bool:
    """The holder ran on this machine and its process is gone (a killed driver run again at once
    need not wait for its lease to expire)."""
    if record.get("host") != socket.gethostname() or record.get("pid") == os.getpid():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError):  # alive under another user, or no pid recorded
        return False
    return False


def holder_record(holder: str, ttl_s: float) -> dict:
    return {
        "holder": holder,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "expires": time.time() + ttl_s,
    }


def acquire(folder: Location, holder: str, ttl_s: float, what: str) -> Lease:
    """The lease under ``folder`` for ``holder``, or ``Busy`` naming who holds it and until when."""
    fs, path = _filesystem(folder)
    for _ in range(5):  # each round either wins, or finds a live holder, or lost a race to a taker
        generations = _generations(fs, path)
        current = None
        if generations:
            try:
                current = json.loads(fs.cat_file(f"{path}/{generations[-1]}"))
            except (FileNotFoundError, ValueError):  # being written or cleaned: look again
                continue
            if current["expires"] > time.time() and not _died_here(current):
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(current["expires"]))
                raise Busy(
                    f"{what} is held by {current['holder']} (pid {current['pid']} on {current['host']}) "
                    f"until {until} unless renewed: wait for it to end, or, if it died, for the lease "
                    f"to expire ({folder.uri})",
                    current,
                )
        number = int(generations[-1][:-5]) + 1 if generations else 0
        record = holder_record(holder, ttl_s)
        mine = f"{path}/{number:08d}.json"
        if create_if_absent(fs, mine, json.dumps(record).encode()):
            for old in generations[:-1]:  # never the newest: the highest one stays the current
                fs.rm_file(f"{path}/{old}")
            return Lease(fs, mine, record, ttl_s).start()
    raise Busy(f"{what}: could not take the lease at {folder.uri} (others keep taking it)", current or {})

"""The driver's side of a job: start it, stream its final rows into the results and errors
tables, count every input row, and write the summary."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import curate, lock, metrics
from pipeline.batch.cluster import actor_wait_s, check_cpus, check_gpus, init_ray
from pipeline.batch.config import RunConfig
from pipeline.faults import failpoint
from pipeline.batch.resume import check_same_settings
from pipeline.batch.rows import good_rows
from pipeline.errors import InputError, TooManyFailures
from pipeline.io.storage import Location
from schemas import errors as err
from schemas import results as res

log = logging.getLogger(__name__)


class RollingParquet:
    """Parquet files of at most ``rows_per_file`` rows under ``folder``, written as rows stream in,
    and at least every ``flush_seconds``, so a killed driver loses little committed work. File
    names carry ``prefix`` (the job and this attempt): a resumed run adds files, never
    overwrites an earlier attempt's."""

    def __init__(
        self,
        folder: Location,
        schema: pa.Schema,
        rows_per_file: int,
        prefix: str,
        flush_seconds: float = float("inf"),
    ):
        self.folder, self.schema, self.limit = folder, schema, rows_per_file
        self.prefix, self.flush_seconds, self.flushed_at = prefix, flush_seconds, time.monotonic()
        self.pending: list[pa.Table] = []
        self.pending_rows = self.files = self.rows = 0

    def add(self, table: pa.Table) -> None:
        if len(table):
            self.pending.append(table.select(self.schema.names).cast(self.schema))
            self.pending_rows += len(table)
            self.rows += len(table)
        while self.pending_rows >= self.limit:
            self._flush(self.limit)
        if self.pending_rows and time.monotonic() - self.flushed_at >= self.flush_seconds:
            self._flush(self.pending_rows)

    def close(self) -> None:
        while self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, n), table.slice(n)
        buffer = io.BytesIO()
        pq.write_table(head, buffer)
        (self.folder / f"{self.prefix}-{self.files:05d}.parquet").write_bytes(buffer.getvalue())
        self.files += 1
        self.flushed_at = time.monotonic()
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        failpoint(f"driver-after-{posixpath.basename(self.folder.uri.rstrip('/'))}")


class Progress:
    """Rows done and failed, rows per second and the time left, as a job log line at most every
    ``every_s`` seconds and once at the end (Ray Data's own progress bar counts blocks, ``0/?``),
    and as the job's metrics (``pipeline.batch.metrics``)."""

    def __init__(self, job: str, todo: int, every_s: float):
        self.job, self.todo, self.every_s = job, todo, every_s
        self.started = self.logged = time.monotonic()
        self.done = self.failed = self.edits = 0

    def update(self, done: int, failed: int, edits: int) -> None:
        """The counts so far: logged, and their growth added to the job's metrics."""
        delta = dict(rows_done=done - self.done, rows_failed=failed - self.failed, edits=edits - self.edits)
        metrics.count(self.job, **delta)
        self.done, self.failed, self.edits = done, failed, edits
        if time.monotonic() - self.logged >= self.every_s:
            self.log()

    def log(self) -> None:
        self.logged = time.monotonic()
        seconds = max(self.logged - self.started, 1e-9)
        finished = self.done + self.failed
        rate = finished / seconds
        left = f"{(self.todo - finished) / rate:.0f} s" if rate > 0 else "?"
        log.info(
            "%s: %d/%d rows done, %d failed, %d edits, %.2f rows/s, %.0f s elapsed, ETA %s",
            self.job,
            self.done,
            self.todo,
            self.failed,
            self.edits,
            rate,
            seconds,
            left,
        )


@contextlib.contextmanager
def start(config: RunConfig, job: str) -> Iterator[tuple[float, str]]:
    """Join or start Ray, check its GPUs and CPUs, take the output's lease (one job writes an
    output at a time), check that the output holds nothing made with other settings, and write
    the resolved config beside the outputs. Yields the start time and this attempt's name, which
    begins with the job's (``run-...``); the lease is given back when the job ends or fails."""
    import ray
    from ray.data import DataContext

    started = time.perf_counter()
    output = config.output_location
    pools = {
        "run": (config.tune_actors, config.edit_actors),
        "tune": (config.tune_actors,),
        "edit": (config.edit_actors,),
        "dataset": (),  # Ray tasks only
    }[job]
    init_ray(config)
    check_gpus(config, sum(pools))
    check_cpus(config, sum(pools))
    attempt = f"{job}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:  # the job's first write: an output it cannot write is one clean error, not a traceback
        lease = lock.acquire(output.lock, attempt, config.lock_ttl_s, f"output {config.output}")
    except OSError as error:
        raise InputError(
            f"cannot write to output {config.output}: {error}; check that the job's credentials may "
            "write under that prefix"
        ) from None
    with lease:
        if job != "dataset":  # it reads results as they are: any run's settings
            check_same_settings(config, job)
        # The context is per process: set it both ways, a driver may run several jobs.
        wait = actor_wait_s(config, pools, ray.cluster_resources())
        DataContext.get_current().wait_for_min_actors_s = wait
        output.config_file(job).write_bytes(config.to_yaml().encode())
        yield started, attempt


def job(name: str) -> Callable:
    """A job's body ``body(config, started, attempt)`` as ``run(config)``, run inside ``start``:
    it holds its output's lease from start to end."""

    def wrap(body: Callable[[RunConfig, float, str], dict]) -> Callable[[RunConfig], dict]:
        @functools.wraps(body)
        def run(config: RunConfig) -> dict:
            with start(config, name) as (started, attempt):
                return body(config, started, attempt)

        return run

    return wrap


def drain(
    ds,
    config: RunConfig,
    attempt: str,
    results_schema: pa.Schema | None,
    todo: int,
    errors_before: list[dict] = (),
) -> dict:
    """Stream the final rows to the driver (small rows: no tensors, no images) and write the
    results and errors tables; count everything for the summary.

    Every row not done is tried again, so this attempt's errors replace the job's earlier ones,
    but only once they are all written: a run that ends early leaves the earlier table. Results
    are written as they come (a re-run skips them); errors, which a re-run makes again, at the
    end (or every ``results_rows_per_file`` rows)."""
    output = config.output_location
    results = results_schema and RollingParquet(
        output.results, results_schema, config.results_rows_per_file, attempt, config.results_flush_seconds
    )
    errors = RollingParquet(output.errors, err.ERRORS_SCHEMA, config.results_rows_per_file, attempt)
    errors.add(pa.Table.from_pylist(list(errors_before), schema=err.ERRORS_SCHEMA))
    ok_ids, early_ids, edit_error_ids = set(), {r[err.ID] for r in errors_before}, set()
    early_errors, resumed_ids, verdicts = len(errors_before), set(), Counter()
    progress = Progress(attempt.partition("-")[0], todo, config.progress_every_s)

    def edit_only_failures() -> int:  # rows whose every edit failed, not failed before editing
        return len(edit_error_ids - ok_ids - early_ids)

    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ():
        ok = good_rows(batch)
        bad = batch.filter(pa.array(~ok))
        if len(bad):
            errors.add(bad.select([err.ID, err.ROW, err.STAGE, err.KIND, err.MESSAGE]))
            for row_id, stage in zip(bad.column(err.ID).to_pylist(), bad.column(err.STAGE).to_pylist()):
                if err.fails_one_edit(stage):
                    edit_error_ids.add(row_id)
                else:
                    early_ids.add(row_id)
                    early_errors += 1
        good = batch.filter(pa.array(ok))
        ids = good.column(res.ID).to_pylist()
        ok_ids.update(ids)
        if res.TUNE_WORKER in good.column_names:  # edited from stored embeddings: not tuned by this run
            resumed_ids.update(i for i, w in zip(ids, good.column(res.TUNE_WORKER).to_pylist()) if w is None)
        if results is not None:
            good = curate.judge(good, config.curate)  # each edit's verdict, in its own row
            verdicts += curate.tally(good)
            results.add(good)
        failed = early_errors + edit_only_failures()  # rows, as ``account`` counts them
        progress.update(len(ok_ids), failed, results.rows if results else 0)
    progress.log()
    errors.close()
    if results is not None:
        results.close()
    drop_earlier_errors(output.errors, attempt)
    return {
        "ok_ids": ok_ids,
        "early_error_rows": early_errors,
        "edit_only_failures": edit_only_failures(),
        "error_rows": errors.rows,
        "result_rows": results.rows if results else 0,
        "resumed": len(resumed_ids),
        "curation": dict(sorted(verdicts.items())),  # kept and rejected edits, by reason (with a scorer)
    }


def drop_earlier_errors(folder: Location, attempt: str) -> None:
    """Delete the errors files of the job's earlier attempts (``{job}-...``), not this one's."""
    job = attempt.partition("-")[0]
    earlier = [
        p
        for p in folder.parquet_files()
        if posixpath.basename(p).startswith(f"{job}-") and not posixpath.basename(p).startswith(f"{attempt}-")
    ]
    folder.delete(earlier)


def account(rows_in: int, counts: dict, already_done: int) -> dict:
    """Every input row is done (now or by an earlier run) or in the errors table, exactly once
    before editing; refuse to report success when the counts do not add up."""
    done = len(counts["ok_ids"]) + already_done
    accounted = done + counts["early_error_rows"] + counts["edit_only_failures"]
    if accounted != rows_in:
        raise RuntimeError(f"accounting failed: {rows_in} rows in, {accounted} accounted for")
    return {
        "rows_in": rows_in,
        "rows_done": done,
        "rows_failed": rows_in - done,
        "error_rows": counts["error_rows"],
        "already_done": already_done,
    }


def finish(config: RunConfig, job: str, started: float, counts: dict) -> dict:
    """The job's summary, written beside its outputs. Raises TooManyFailures, after writing it,
    when more than ``max_failed_fraction`` of the rows failed."""
    summary = {
        "job": job,
        "output": config.output,
        "seconds": round(time.perf_counter() - started, 3),
        **counts,
    }
    new_rows = counts["rows_done"] - counts["already_done"]
    summary["rows_per_second"] = round(new_rows / max(summary["seconds"], 1e-9), 4)
    config.output_location.summary_file(job).write_bytes(json.dumps(summary, indent=2).encode())
    check_failures(config, summary)
    return summary


def check_failures(config: RunConfig, summary: dict) -> None:
    """Refuse to call a job a success when more than ``max_failed_fraction`` of its rows failed."""
    failed, rows = summary["rows_failed"], summary["rows_in"]
    if failed > config.max_failed_fraction * rows:
        raise TooManyFailures(
            f"{failed} of {rows} rows failed ({failed / rows:.0%}), more than max_failed_fraction="
            f"{config.max_failed_fraction:g}: the errors table {config.output_location.errors} says why "
            "each failed; fix those inputs and run the job again on the same output (it retries only "
            "the failed rows), or raise max_failed_fraction",
            summary,
        )

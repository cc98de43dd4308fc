"""The driver's side of a job: start it, stream its final rows into the results and errors
tables, count every input row, and write the summary."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from typing import Callable, Iterator

import pyarrow as pa

from pipeline.batch import curate, lock, metrics
from pipeline.batch.cluster import actor_wait_s, check_cpus, check_gpus, init_ray
from pipeline.batch.config import RunConfig
from pipeline.batch.output import RollingParquet
from pipeline.batch.resume import check_same_settings
from pipeline.batch.rows import good_rows
from pipeline.errors import InputError, TooManyFailures
from pipeline.io.storage import Location
from schemas import errors as err
from schemas import results as res

log = logging.getLogger(__name__)


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
    tally, verdicts = Tally(errors_before), Counter()
    progress = metrics.Progress(attempt.partition("-")[0], todo, config.progress_every_s)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ():
        ok = good_rows(batch)
        bad = batch.filter(pa.array(~ok))
        errors.add(bad.select([err.ID, err.ROW, err.STAGE, err.KIND, err.MESSAGE]))
        good = batch.filter(pa.array(ok))
        tally.add(bad, good)
        if results is not None:
            good = curate.judge(good, config.curate)  # each edit's verdict, in its own row
            verdicts += curate.tally(good)
            results.add(good)
        progress.update(len(tally.ok_ids), tally.failed, results.rows if results else 0)
    progress.log()
    errors.close()
    if results is not None:
        results.close()
    drop_earlier_errors(output.errors, attempt)
    return {
        "tally": tally,
        "error_rows": errors.rows,
        "result_rows": results.rows if results else 0,
        "resumed": len(tally.resumed_ids),
        "curation": dict(sorted(verdicts.items())),  # kept and rejected edits, by reason (with a scorer)
    }


class Tally:
    """Each input row's fate, from the final rows as they stream in: done (a row with a result),
    failed before editing (one error row each: read, validate, tune), or failed in editing only
    (an error of one of its edits, ``errors.fails_one_edit``, and none of its edits made). Rows
    that ``errors_before`` holds (refused on the driver) failed before editing."""

    def __init__(self, errors_before: list[dict] = ()):
        self.ok_ids, self.early_ids, self.edit_error_ids = set(), {r[err.ID] for r in errors_before}, set()
        self.early_errors, self.resumed_ids = len(errors_before), set()

    def add(self, bad: pa.Table, good: pa.Table) -> None:
        """A batch's error rows and result rows."""
        for row_id, stage in zip(bad.column(err.ID).to_pylist(), bad.column(err.STAGE).to_pylist()):
            if err.fails_one_edit(stage):
                self.edit_error_ids.add(row_id)
            else:
                self.early_ids.add(row_id)
                self.early_errors += 1
        ids = good.column(res.ID).to_pylist()
        self.ok_ids.update(ids)
        if res.TUNE_WORKER in good.column_names:  # edited from stored embeddings: not tuned by this run
            workers = good.column(res.TUNE_WORKER).to_pylist()
            self.resumed_ids.update(i for i, w in zip(ids, workers) if w is None)

    @property
    def edit_only_failures(self) -> int:
        """Rows whose every edit failed, and that did not fail before editing."""
        return len(self.edit_error_ids - self.ok_ids - self.early_ids)

    @property
    def failed(self) -> int:
        return self.early_errors + self.edit_only_failures


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
    before editing (``drain``'s ``Tally``); refuse to report success when the counts do not add up."""
    tally: Tally = counts["tally"]
    done = len(tally.ok_ids) + already_done
    accounted = done + tally.failed
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

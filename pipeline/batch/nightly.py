"""The nightly job: every manifest under a prefix that no earlier run processed, each run by
``jobs.run`` (``batch.run_all``) into its own output under the night's run id, then a report.

Under ``output``::

    {run_id}/config-nightly.yaml     the resolved config
    {run_id}/{manifest}/             one jobs.run output per manifest: embeddings/, images/, results/, errors/
    {run_id}/report.json, report.md, contact_sheet.png
    _ledger/                         one row per processed manifest (schemas/ledger.py), unless nightly.ledger

A manifest gets its ledger row only once its run succeeded: it ran to the end and at most
``max_failed_fraction`` of its rows failed (those are in its errors table). One whose run failed
gets none, and the night fails after its report: the next run takes it again, and a re-run with
the same run id resumes its output where the failed one stopped, trying its failed rows again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import posixpath
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.batch import lock
from pipeline.batch.dataset import run_dataset
from pipeline.batch.jobs import run_all
from pipeline.batch.output import Output
from pipeline.errors import InputError, PTIError, TooManyFailures
from pipeline.batch.report import count_edits, edit_rows, night_report, write_night_report
from pipeline.batch.config import RunConfig
from pipeline.io.storage import Location, is_allowed, key_for_id, normalize_uri
from schemas import ledger as led

log = logging.getLogger(__name__)


class NightFailed(PTIError):
    """Some manifests of a night failed; the others are done and the report is written."""


def resolve(config: RunConfig) -> RunConfig:
    """The night's config: its run id set (default: today's UTC date), after checking that it has
    a prefix of manifests and that nothing it writes lies under that prefix."""
    night = config.nightly
    if not night.manifests:
        raise InputError("no manifests prefix given: set nightly.manifests in the config or pass --manifests")
    if config.manifest:
        raise InputError(
            f"jobs.nightly takes every manifest under nightly.manifests; unset manifest ({config.manifest})"
        )
    for name, uri in (("output", config.output), ("nightly.ledger", ledger(config).uri)):
        if is_allowed(normalize_uri(uri), [night.manifests]):  # in normal form: "a/./b" is under "a/"
            raise InputError(
                f"{name} {uri} lies under nightly.manifests {night.manifests}: "
                "its files would be taken for manifests"
            )
    if night.dataset and not config.scorer:
        raise InputError(
            "nightly.dataset writes each manifest's kept edits as a training set, and edits are kept "
            "by their scores: set scorer (README, Scores)"
        )
    run_id = night.run_id or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return dataclasses.replace(config, nightly=dataclasses.replace(night, run_id=run_id))


def ledger(config: RunConfig) -> Location:
    """The table of processed manifests."""
    if config.nightly.ledger:
        return Location(config.nightly.ledger, config.endpoint_url)
    return config.output_location.root / "_ledger"  # '_': never a run id


def list_manifests(prefix: Location) -> dict[str, str]:
    """Every Parquet file under ``prefix`` (hidden and ``_`` files are not manifests): its
    normalized URI (the ledger's key) -> its path under the prefix."""
    fs, base = prefix.filesystem()
    if fs.get_file_info(base).type == pafs.FileType.File:
        raise InputError(
            f"nightly.manifests {prefix} is one file: give the prefix (folder) that manifests arrive under"
        )
    relative = [posixpath.relpath(path, base) for path in prefix.parquet_files()]
    return {normalize_uri((prefix / r).uri): r for r in relative}


def night_root(config: RunConfig) -> Location:
    return config.output_location.root / config.nightly.run_id


def manifest_output(config: RunConfig, relative: str) -> str:
    """Where a manifest's outputs go tonight: its path under the prefix, as one folder name."""
    return (night_root(config) / key_for_id(relative.removesuffix(".parquet"))).uri


def read_ledger(uri: Location) -> list[dict]:
    table = uri.read_columns(led.LEDGER_SCHEMA.names)
    return table.to_pylist() if table is not None else []


def record(uri: Location, row: dict) -> None:
    """Add a manifest's row to the ledger: one file per manifest, named by its URI, written whole."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=led.LEDGER_SCHEMA), buffer)
    name = manifest_key(row[led.MANIFEST])
    (uri / f"{name}.parquet").write_bytes(buffer.getvalue())


def claim_of(processed: Location, manifest: str) -> Location:
    """The lease a night holds on a manifest while it runs it: two nights never take the same one."""
    return processed / "_claims" / manifest_key(manifest)


def manifest_key(manifest: str) -> str:
    """A manifest's name under the ledger: its ledger row's file and its claim."""
    return hashlib.sha256(manifest.encode()).hexdigest()[:20]


def outcome(entry: dict) -> str:
    """A manifest's log line once its run ended."""
    if "error" in entry and led.ROWS_IN not in entry:
        return f"{entry[led.MANIFEST]} failed after {entry[led.SECONDS]:.0f} s: {entry['error']}"
    status = "failed (too many failed rows)" if "error" in entry else "done"
    return (
        f"{entry[led.MANIFEST]} {status}: {entry[led.ROWS_DONE]} of {entry[led.ROWS_IN]} rows done, "
        f"{entry[led.ROWS_FAILED]} failed, {entry[led.EDITS]} edits in {entry[led.SECONDS]:.0f} s "
        f"-> {entry[led.OUTPUT]}"
    )


def gpus_held(config: RunConfig) -> float:
    """GPUs a jobs.run holds while it runs: both stages' actors live at once."""
    return config.gpus_per_actor * (config.tune_actors + config.edit_actors)


def run_manifest(config: RunConfig, manifest: str, relative: str) -> dict:
    """One manifest through jobs.run: its ledger row if it succeeded; else what failed (with the
    counts, when it ran to the end but too many of its rows failed)."""
    output, began = manifest_output(config, relative), time.perf_counter()
    run = dataclasses.replace(config, manifest=manifest, output=output)
    try:
        row = ledger_row(config, manifest, output, run_all(run), began)  # the run's time, not the set's
        if config.nightly.dataset:  # its training set, once its run succeeded (a re-run writes it again)
            run_dataset(run)
    except TooManyFailures as exc:  # it ran to the end: its counts go in the report, not the ledger
        log.error("manifest %s failed: %s", manifest, exc)
        failed = ledger_row(config, manifest, output, exc.summary, began)
        return {**failed, "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 -- the night goes on; the report and exit status say it failed
        log.exception("manifest %s failed", manifest)
        return {
            led.MANIFEST: manifest,
            led.OUTPUT: output,
            led.SECONDS: time.perf_counter() - began,
            led.GPUS: gpus_held(config),
            "error": f"{type(exc).__name__}: {exc}",
        }
    return row


def ledger_row(config: RunConfig, manifest: str, output: str, summary: dict, began: float) -> dict:
    """A manifest's row of the ledger (``schemas.ledger``) from its jobs.run summary."""
    return {
        led.MANIFEST: manifest,
        led.RUN_ID: config.nightly.run_id,
        led.OUTPUT: output,
        led.FINISHED_AT: datetime.now(timezone.utc).replace(microsecond=0),
        led.ROWS_IN: summary["rows_in"],
        led.ROWS_DONE: summary["rows_done"],
        led.ROWS_FAILED: summary["rows_failed"],
        led.EDITS: count_edits(Output.at(output, config.endpoint_url)),
        led.SECONDS: time.perf_counter() - began,
        led.ROWS_PER_SECOND: summary["rows_per_second"],
        led.GPUS: gpus_held(config),
    }


def sample_rows(entries: list[dict], count: int, endpoint_url: str | None) -> list:
    """Contact-sheet rows of about ``count`` images, spread over the manifests that were done:
    each input with its edits, every image with its caption (``report.edit_rows``)."""
    done = [e for e in entries if "error" not in e]
    rows: list = []
    for entry in done:
        limit = min(math.ceil(count / len(done)), count - len(rows))
        output, manifest = (
            Output.at(entry[led.OUTPUT], endpoint_url),
            Location(entry[led.MANIFEST], endpoint_url),
        )
        rows += edit_rows(output, manifest, limit=limit)
    return rows


def run_nightly(config: RunConfig) -> dict:
    """``jobs.nightly``: the manifests under ``nightly.manifests`` without a ledger row, each
    through jobs.run; the ledger row of each that succeeded; the night's report. Raises
    NightFailed, after the report, when any manifest failed."""
    started = time.perf_counter()
    config = resolve(config)
    night, endpoint = config.nightly, config.endpoint_url
    root, processed = night_root(config), ledger(config)
    (root / "config-nightly.yaml").write_bytes(config.to_yaml().encode())
    rows = read_ledger(processed)
    earlier_nights = {r[led.MANIFEST] for r in rows if r[led.RUN_ID] != night.run_id}
    entries = [r for r in rows if r[led.RUN_ID] == night.run_id]  # done by an earlier attempt of this night
    manifests = list_manifests(Location(night.manifests, endpoint))
    done = earlier_nights | {e[led.MANIFEST] for e in entries}
    new = [m for m in manifests if m not in done]
    log.info(
        "night %s: %d manifests under %s, %d new", night.run_id, len(manifests), night.manifests, len(new)
    )
    for number, manifest in enumerate(new, 1):
        log.info("night %s: manifest %d of %d: %s", night.run_id, number, len(new), manifest)
        try:
            claim = lock.acquire(claim_of(processed, manifest), night.run_id, config.lock_ttl_s, manifest)
        except lock.Busy as busy:  # another night (or an earlier attempt, still alive) runs it
            log.warning("night %s: skipped %s: %s", night.run_id, manifest, busy)
            continue
        with claim:
            if manifest in {r[led.MANIFEST] for r in read_ledger(processed)}:  # done while we waited
                log.info("night %s: %s was done by another night meanwhile", night.run_id, manifest)
                continue
            entry = run_manifest(config, manifest, manifests[manifest])
            if "error" not in entry:
                record(processed, entry)
        entries.append(entry)
        log.info("night %s: %s", night.run_id, outcome(entry))
    skipped = sum(1 for m in manifests if m in earlier_nights)
    report = night_report(night.run_id, night.manifests, entries, skipped, night.gpu_hour_price, endpoint)
    uri = write_night_report(root, report, sample_rows(entries, night.sample_images, endpoint))
    totals = report["totals"]
    if totals["manifests_failed"]:
        failed = ", ".join(m["manifest"] for m in report["manifests"] if m["status"] == "failed")
        raise NightFailed(
            f"night {night.run_id}: {totals['manifests_failed']} of {totals['manifests']} manifests failed "
            f"({failed}); "
            f"the report is {uri}; fix the cause and run again with --run-id {night.run_id} to resume them"
        )
    kept = {k: v for k, v in totals.items() if k not in ("seconds", "gpu_hour_price")}
    seconds = round(time.perf_counter() - started, 3)
    return {"job": "nightly", "run_id": night.run_id, "seconds": seconds, **kept, "report": uri}

"""What a batch run made, for people: sample edits beside their inputs, the kinds of its errors,
and the nightly job's run report (``report.json``, ``report.md``, ``contact_sheet.png``)."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow.parquet as pq
from torch import Tensor

from pipeline.images import contact_sheet, decode_rgb, load_image, read_bytes, to_tensor
from pipeline.storage import arrow_filesystem, join, read_columns, storage_options, write_bytes
from schemas import ledger as led
from schemas import manifest as man
from schemas import results as res

COUNTS = (led.ROWS_IN, led.ROWS_DONE, led.ROWS_FAILED, led.EDITS)  # per manifest and in total

def edit_rows(output: str, manifest: str, endpoint_url: str | None = None, limit: int | None = None) -> list[list[Tensor]]:
    """A contact sheet's rows for a ``jobs.run`` output: one per edited image (the first ``limit``
    ids in order), its input then its edits in (target, eta) order, at the edits' size."""
    results = read_columns(join(output, "results"), [res.ID, res.TARGET_INDEX, res.ETA, res.IMAGE_URI], endpoint_url)
    if results is None:
        return []
    results = results.sort_by([(res.ID, "ascending"), (res.TARGET_INDEX, "ascending"), (res.ETA, "ascending")])
    edits: dict[str, list[str]] = {}
    for row_id, uri in zip(results[res.ID].to_pylist(), results[res.IMAGE_URI].to_pylist()):
        edits.setdefault(row_id, []).append(uri)
    ids = sorted(edits)[:limit]
    inputs = _manifest_images(manifest, ids, endpoint_url)
    rows = []
    for row_id in ids:
        images = [_edit_image(uri, endpoint_url) for uri in edits[row_id]]
        source = inputs[row_id]
        options = storage_options(source, endpoint_url) if isinstance(source, str) else {}
        rows.append([load_image(source, images[0].shape[-1], name=row_id, storage_options=options), *images])
    return rows


def _manifest_images(manifest: str, ids: list[str], endpoint_url: str | None) -> dict:
    """id -> the manifest's image (URI or bytes) for ``ids``; only their rows are read."""
    if not ids:
        return {}
    fs, path = arrow_filesystem(manifest, endpoint_url)
    table = pq.ParquetDataset(path, filesystem=fs, filters=[(man.ID, "in", ids)]).read(columns=[man.ID, man.IMAGE])
    return dict(zip(table[man.ID].to_pylist(), table[man.IMAGE].to_pylist()))


def _edit_image(uri: str, endpoint_url: str | None) -> Tensor:
    return to_tensor(decode_rgb(read_bytes(uri, storage_options=storage_options(uri, endpoint_url)), uri))


def error_kinds(output: str, endpoint_url: str | None = None) -> dict[str, int]:
    """How many rows of an output's errors table have each ``kind``, most first."""
    errors = read_columns(join(output, "errors"), ["kind"], endpoint_url)
    return dict(Counter(errors["kind"].to_pylist() if errors is not None else []).most_common())


def count_edits(output: str, endpoint_url: str | None = None) -> int:
    """Rows of an output's results table: every edit made, by any attempt."""
    results = read_columns(join(output, "results"), [res.ID], endpoint_url)
    return results.num_rows if results is not None else 0


# --- the nightly run report --------------------------------------------------------------------


def night_report(run_id: str, manifests_prefix: str, entries: list[dict], skipped: int, gpu_hour_price: float | None,
                 endpoint_url: str | None = None) -> dict:  # fmt: skip
    """The report of a night: ``entries`` are its manifests, ledger rows (``schemas.ledger``) of
    those done, and ``manifest``/``output``/``seconds``/``gpus``/``error`` of those that failed.
    GPU hours are job seconds x the GPUs the job's actors held; the cost is those at the price."""
    manifests = [_manifest_report(e, endpoint_url) for e in entries]
    done = [m for m in manifests if m["status"] == "done"]
    gpu_hours = sum(m["gpu_hours"] for m in manifests)
    seconds = sum(m["seconds"] for m in manifests)
    kinds: Counter = Counter()
    for m in manifests:
        kinds.update(m["error_kinds"])
    totals = {
        "manifests": len(manifests), "manifests_done": len(done), "manifests_failed": len(manifests) - len(done),
        "manifests_skipped": skipped,
        **{key: sum(m[key] for m in done) for key in COUNTS},
        "error_kinds": dict(kinds.most_common()), "seconds": round(seconds, 3),
        "rows_per_second": round(sum(m["rows_per_second"] * m["seconds"] for m in done) / seconds, 4) if seconds else 0.0,
        "gpu_hours": round(gpu_hours, 4), "gpu_hour_price": gpu_hour_price,
        "cost_estimate": None if gpu_hour_price is None else round(gpu_hours * gpu_hour_price, 2),
    }  # fmt: skip
    return {"run_id": run_id, "manifests_prefix": manifests_prefix, "manifests": manifests, "totals": totals}


def _manifest_report(entry: dict, endpoint_url: str | None) -> dict:
    failed = "error" in entry
    counts = {key: None if failed else entry[key] for key in COUNTS}
    return {
        "manifest": entry[led.MANIFEST], "output": entry[led.OUTPUT], "status": "failed" if failed else "done",
        "error": entry.get("error"), **counts, "error_kinds": error_kinds(entry[led.OUTPUT], endpoint_url),
        "seconds": round(entry[led.SECONDS], 3), "rows_per_second": 0.0 if failed else entry[led.ROWS_PER_SECOND],
        "gpu_hours": round(entry[led.SECONDS] * entry[led.GPUS] / 3600, 4),
    }  # fmt: skip


def write_night_report(root: str, report: dict, sheet_rows: list[list[Tensor]], endpoint_url: str | None = None) -> str:
    """``report.json``, ``report.md`` and (with sample edits) ``contact_sheet.png`` under
    ``root``; returns the report's URI."""
    if sheet_rows:
        buffer = io.BytesIO()
        contact_sheet(sheet_rows).save(buffer, format="PNG")
        write_bytes(join(root, "contact_sheet.png"), buffer.getvalue(), endpoint_url)
    report = {**report, "contact_sheet": join(root, "contact_sheet.png") if sheet_rows else None}
    write_bytes(join(root, "report.md"), report_markdown(report).encode(), endpoint_url)
    write_bytes(join(root, "report.json"), json.dumps(report, indent=2).encode(), endpoint_url)
    return join(root, "report.json")


def report_markdown(report: dict) -> str:
    """The report in a page: totals, cost, error kinds, a table of manifests, the contact sheet."""
    t = report["totals"]
    cost = "no price set (nightly.gpu_hour_price)"
    if t["cost_estimate"] is not None:
        cost = f"{t['cost_estimate']:.2f} at {t['gpu_hour_price']:g} per GPU hour"
    kinds = ", ".join(f"{kind} {n}" for kind, n in t["error_kinds"].items()) or "none"
    lines = [
        f"# Nightly run {report['run_id']}", "",
        f"Manifests under `{report['manifests_prefix']}`: {t['manifests_done']} done, {t['manifests_failed']} failed, "
        f"{t['manifests_skipped']} processed by earlier nights.", "",
        f"- rows: {t['rows_in']} in, {t['rows_done']} done, {t['rows_failed']} failed; {t['edits']} edits",
        f"- throughput: {t['rows_per_second']:g} rows/s over {t['seconds']:g} s of jobs",
        f"- GPU hours: {t['gpu_hours']:g}; estimated cost: {cost}",
        f"- error kinds: {kinds} (each output's `errors/` table)", "",
        "| manifest | status | rows in | done | failed | edits | seconds | rows/s | GPU h | output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for m in report["manifests"]:
        counts = " | ".join("-" if m[k] is None else str(m[k]) for k in COUNTS)
        lines.append(f"| `{m['manifest']}` | {m['status']} | {counts} | {m['seconds']:g} | {m['rows_per_second']:g} | "
                     f"{m['gpu_hours']:g} | `{m['output']}` |")  # fmt: skip
    failed = [f"- `{m['manifest']}`: {m['error']}" for m in report["manifests"] if m["error"]]
    if failed:
        lines += ["", "Failed (no ledger row: the next run takes them again):", "", *failed]
    if report["contact_sheet"]:
        lines += ["", "Sample edits (a row per image: its input, then its edits):", "", "![sample edits](contact_sheet.png)"]
    return "\n".join(lines) + "\n"

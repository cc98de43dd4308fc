"""What a batch run made, for people: sample edits beside their inputs, the kinds of its errors,
and the nightly job's run report (``report.json``, ``report.md``, ``contact_sheet.png``)."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image
from torch import Tensor

from pipeline.io.fetch import read_bytes
from pipeline.io.images import decode_rgb, load_image, to_tensor
from pipeline.io.sheets import SHEET_TILE, contact_sheet, edit_caption
from pipeline.batch.curate import tally
from pipeline.batch.output import Output
from pipeline.batch.resume import read_results
from pipeline.io.storage import Location
from schemas import errors as err
from schemas import ledger as led
from schemas import manifest as man
from schemas import results as res

log = logging.getLogger(__name__)

COUNTS = (led.ROWS_IN, led.ROWS_DONE, led.ROWS_FAILED, led.EDITS)  # per manifest and in total


SheetRow = list[tuple[Tensor, str]]  # a contact sheet's row: each image with its caption


def edit_rows(output: Output, manifest: Location, limit: int | None = None) -> list[SheetRow]:
    """A contact sheet's rows for a ``jobs.run`` output: one per edited image (the first ``limit``
    ids in order), its input (captioned with its id) then its edits in (target, eta) order
    (captioned with eta and target prompt), at the edits' size."""
    results = read_results(output, [res.ID, res.TARGET_INDEX, res.ETA, res.TARGET_PROMPT, res.IMAGE_URI])
    if results is None:
        return []
    order = [(res.ID, "ascending"), (res.TARGET_INDEX, "ascending"), (res.ETA, "ascending")]
    results = results.sort_by(order)
    edits: dict[str, list[tuple[str, str]]] = {}
    for row in results.select([res.ID, res.ETA, res.TARGET_PROMPT, res.IMAGE_URI]).to_pylist():
        caption = edit_caption(row[res.TARGET_PROMPT], row[res.ETA])
        edits.setdefault(row[res.ID], []).append((row[res.IMAGE_URI], caption))
    ids = sorted(edits)[:limit]
    inputs = _manifest_images(manifest, ids)
    rows = []
    for row_id in ids:
        images = [(_edit_image(Location(uri, output.root.endpoint_url)), c) for uri, c in edits[row_id]]
        source = inputs[row_id]
        options = Location(source, manifest.endpoint_url).storage_options() if isinstance(source, str) else {}
        size = images[0][0].shape[-1]
        pixels = load_image(source, size, name=row_id, storage_options=options)
        rows.append([(pixels, short_id(row_id)), *images])
    return rows


def short_id(row_id: str, limit: int = 40) -> str:
    """An id to print under its image: a long one keeps its start and end, where ids differ."""
    return row_id if len(row_id) <= limit else f"{row_id[: limit - 16]}\u2026{row_id[-15:]}"


def labelled_sheet(rows: list[SheetRow]) -> Image.Image:
    """The contact sheet of ``rows``: each image at ``SHEET_TILE`` px with its caption under it."""
    return contact_sheet(
        [[pixels for pixels, _ in row] for row in rows],
        labels=[[caption for _, caption in row] for row in rows],
        tile=SHEET_TILE,
    )


def write_contact_sheet(output: Output, manifest: Location, images: int) -> str | None:
    """``contact_sheet.png`` of a ``jobs.run`` output: its first ``images`` edited inputs, each
    with its edits; returns its URI. A sheet that cannot be made (an input deleted since it was
    read) is a warning, not a failed job: None."""
    try:
        rows = edit_rows(output, manifest, limit=images)
        if not rows:
            return None
        buffer = io.BytesIO()
        labelled_sheet(rows).save(buffer, format="PNG")
        output.contact_sheet.write_bytes(buffer.getvalue())
    except Exception as exc:  # the edits are written: a picture of them must not fail the job
        log.warning("no contact sheet for %s: %s: %s", output.root, type(exc).__name__, exc)
        return None
    return output.contact_sheet.uri


def _manifest_images(manifest: Location, ids: list[str]) -> dict:
    """id -> the manifest's image (URI or bytes) for ``ids``; only their rows are read."""
    if not ids:
        return {}
    fs, _ = manifest.filesystem()
    files, _ = manifest.parquet_input()  # only its *.parquet files: a folder may hold others
    table = pq.ParquetDataset(files, filesystem=fs, filters=[(man.ID, "in", ids)]).read(
        columns=[man.ID, man.IMAGE]
    )
    return dict(zip(table[man.ID].to_pylist(), table[man.IMAGE].to_pylist()))


def _edit_image(image: Location) -> Tensor:
    return to_tensor(decode_rgb(read_bytes(image.uri, storage_options=image.storage_options()), image.uri))


def error_kinds(output: Output) -> dict[str, int]:
    """How many rows of an output's errors table have each ``kind``, most first."""
    errors = output.errors.read_columns([err.KIND])
    return dict(Counter(errors[err.KIND].to_pylist() if errors is not None else []).most_common())


def verdicts(output: Output) -> dict[str, int]:
    """An output's scored edits counted as a job's summary counts them (``curate.tally``): kept,
    rejected and rejected by each score; none for results without verdicts (no scorer)."""
    results = read_results(output, [res.KEPT, res.REJECTED_BY])  # null in results older than verdicts
    return dict(sorted(tally(results).items())) if results is not None else {}


def count_edits(output: Output) -> int:
    """Rows of an output's results table: every edit made, by any attempt, once."""
    results = read_results(output, [res.ID])
    return results.num_rows if results is not None else 0


# --- the nightly run report --------------------------------------------------------------------


def night_report(
    run_id: str,
    manifests_prefix: str,
    entries: list[dict],
    skipped: int,
    gpu_hour_price: float | None,
    endpoint_url: str | None = None,
) -> dict:
    """The report of a night: ``entries`` are its manifests, ledger rows (``schemas.ledger``) of
    those done, and ``manifest``/``output``/``seconds``/``gpus``/``error`` of those that failed
    (with the counts too, for one that ran to the end with too many failed rows).
    GPU hours are job seconds x the GPUs the job's actors held; the cost is those at the price."""
    manifests = [_manifest_report(e, endpoint_url) for e in entries]
    done = [m for m in manifests if m["status"] == "done"]
    gpu_hours = sum(m["gpu_hours"] for m in manifests)
    seconds = sum(m["seconds"] for m in manifests)
    kinds: Counter = Counter()
    judged: Counter = Counter()
    for m in manifests:
        kinds.update(m["error_kinds"])
        judged.update(m["verdicts"])
    totals = {
        "manifests": len(manifests),
        "manifests_done": len(done),
        "manifests_failed": len(manifests) - len(done),
        "manifests_skipped": skipped,
        **{key: sum(m[key] for m in manifests if m[key] is not None) for key in COUNTS},
        "error_kinds": dict(kinds.most_common()),
        "verdicts": dict(sorted(judged.items())),  # scored edits kept and rejected, by reason
        "seconds": round(seconds, 3),
        "rows_per_second": round(sum(m["rows_per_second"] * m["seconds"] for m in manifests) / seconds, 4)
        if seconds
        else 0.0,
        "gpu_hours": round(gpu_hours, 4),
        "gpu_hour_price": gpu_hour_price,
        "cost_estimate": None if gpu_hour_price is None else round(gpu_hours * gpu_hour_price, 2),
    }
    return {"run_id": run_id, "manifests_prefix": manifests_prefix, "manifests": manifests, "totals": totals}


def _manifest_report(entry: dict, endpoint_url: str | None) -> dict:
    failed = "error" in entry
    counts = {key: entry.get(key) for key in COUNTS}  # None: the run stopped before it counted
    return {
        "manifest": entry[led.MANIFEST],
        "output": entry[led.OUTPUT],
        "status": "failed" if failed else "done",
        "error": entry.get("error"),
        **counts,
        "error_kinds": error_kinds(Output.at(entry[led.OUTPUT], endpoint_url)),
        "verdicts": verdicts(Output.at(entry[led.OUTPUT], endpoint_url)),
        "seconds": round(entry[led.SECONDS], 3),
        "rows_per_second": entry.get(led.ROWS_PER_SECOND, 0.0),
        "gpu_hours": round(entry[led.SECONDS] * entry[led.GPUS] / 3600, 4),
    }


def write_night_report(root: Location, report: dict, sheet_rows: list[SheetRow]) -> str:
    """``report.json``, ``report.md`` and (with sample edits) ``contact_sheet.png`` under
    ``root``; returns the report's URI."""
    if sheet_rows:
        buffer = io.BytesIO()
        labelled_sheet(sheet_rows).save(buffer, format="PNG")
        (root / "contact_sheet.png").write_bytes(buffer.getvalue())
    report = {**report, "contact_sheet": (root / "contact_sheet.png").uri if sheet_rows else None}
    (root / "report.md").write_bytes(report_markdown(report).encode())
    (root / "report.json").write_bytes(json.dumps(report, indent=2).encode())
    return (root / "report.json").uri


def _verdict_line(counts: dict[str, int]) -> str:
    """``kept 12, rejected 3 (clip_sim_dir 2, clip_sim_image 1)``."""
    by = [f"{k.removeprefix('rejected_by_')} {n}" for k, n in counts.items() if k.startswith("rejected_by_")]
    line = f"kept {counts.get('kept', 0)}, rejected {counts.get('rejected', 0)}"
    return line + (f" ({', '.join(by)})" if by else "")


def report_markdown(report: dict) -> str:
    """The report in a page: totals, cost, error kinds, a table of manifests, the contact sheet."""
    t = report["totals"]
    cost = "no price set (nightly.gpu_hour_price)"
    if t["cost_estimate"] is not None:
        cost = f"{t['cost_estimate']:.2f} at {t['gpu_hour_price']:g} per GPU hour"
    kinds = ", ".join(f"{kind} {n}" for kind, n in t["error_kinds"].items()) or "none"
    verdicts = t.get("verdicts") or {}  # reports written before verdicts existed have none
    scored = []
    if verdicts:
        scored.append(f"- scored edits: {_verdict_line(verdicts)} (results' `kept`, `rejected_by`)")
    lines = [
        f"# Nightly run {report['run_id']}",
        "",
        f"Manifests under `{report['manifests_prefix']}`: {t['manifests_done']} done, "
        f"{t['manifests_failed']} failed, "
        f"{t['manifests_skipped']} processed by earlier nights.",
        "",
        f"- rows: {t['rows_in']} in, {t['rows_done']} done, {t['rows_failed']} failed; {t['edits']} edits",
        f"- throughput: {t['rows_per_second']:g} rows/s over {t['seconds']:g} s of jobs",
        f"- GPU hours: {t['gpu_hours']:g}; estimated cost: {cost}",
        f"- error kinds: {kinds} (each output's `errors/` table)",
        *scored,
        "",
        "| manifest | status | rows in | done | failed | edits | seconds | rows/s | GPU h | output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in report["manifests"]:
        counts = " | ".join("-" if m[k] is None else str(m[k]) for k in COUNTS)
        lines.append(
            f"| `{m['manifest']}` | {m['status']} | {counts} | {m['seconds']:g} | {m['rows_per_second']:g} | "
            f"{m['gpu_hours']:g} | `{m['output']}` |"
        )
    failed = [f"- `{m['manifest']}`: {m['error']}" for m in report["manifests"] if m["error"]]
    if failed:
        lines += ["", "Failed (no ledger row: the next run takes them again):", "", *failed]
    if report["contact_sheet"]:
        lines += [
            "",
            "Sample edits (a row per image: its input and id, then its edits with their eta and prompt):",
            "",
            "![sample edits](contact_sheet.png)",
        ]
    return "\n".join(lines) + "\n"

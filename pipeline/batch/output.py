"""A batch job's output: one prefix, and where each of its parts lies under it (README, "Outputs")."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.io.storage import Location, key_for_id
from schemas.manifest import eta_name


def image_key(row_id: str, target_index: int, eta: float) -> str:
    """``images/{id}/{target_index}-{eta}.png`` with the id safely encoded: one folder name of at
    most 255 bytes (a long id is cut and ends with a hash of it), so the whole key stays far
    under S3's 1,024 bytes beside any reasonable output prefix."""
    return f"images/{key_for_id(row_id)}/{target_index}-{eta_name(eta)}.png"


@dataclass(frozen=True)
class Output:
    """``root`` and its parts: ``embeddings/`` (or another location of stored stage-1 rows),
    ``results/``, ``errors/``, ``images/``, ``contact_sheet.png``, and each job's
    ``config-{job}.yaml`` and ``summary-{job}.json``."""

    root: Location
    embeddings: Location

    @classmethod
    def at(cls, uri: str, endpoint_url: str | None = None, embeddings: str | None = None) -> Output:
        root = Location(uri, endpoint_url)
        return cls(root, Location(embeddings, endpoint_url) if embeddings else root / "embeddings")

    @property
    def results(self) -> Location:
        return self.root / "results"

    @property
    def errors(self) -> Location:
        return self.root / "errors"

    @property
    def images(self) -> Location:
        return self.root / "images"

    @property
    def lock(self) -> Location:
        """The lease of the job writing this output (``pipeline.batch.lock``)."""
        return self.root / "_lock"

    @property
    def contact_sheet(self) -> Location:
        """``jobs.run``'s picture of its first edits (``pipeline.batch.report``)."""
        return self.root / "contact_sheet.png"

    def config_file(self, job: str) -> Location:
        return self.root / f"config-{job}.yaml"

    def summary_file(self, job: str) -> Location:
        return self.root / f"summary-{job}.json"

    def image(self, row_id: str, target_index: int, eta: float) -> Location:
        return self.root / image_key(row_id, target_index, eta)

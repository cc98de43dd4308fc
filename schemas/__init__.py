"""Arrow schemas: the one place that names the project's columns and their types."""

from schemas.embeddings import (  # noqa: F401
    EMBEDDINGS_COLUMNS,
    embeddings_schema,
)
from schemas.ledger import LEDGER_SCHEMA  # noqa: F401
from schemas.errors import ERRORS_SCHEMA  # noqa: F401
from schemas.manifest import (  # noqa: F401
    MANIFEST_SCHEMA,
    duplicated_ids,
    schema_problems,
    validate_rows,
)
from schemas.results import RESULTS_SCHEMA  # noqa: F401

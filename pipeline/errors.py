"""The errors the pipeline raises on purpose: each names the input and says what to do."""


class PTIError(Exception):
    """Base of the errors a user can act on."""


class ModelError(PTIError):
    """A checkpoint that cannot be found, reached or loaded."""


class DeviceError(PTIError):
    """A process that would run on another device than the one it was given: e.g. a Ray actor
    given GPUs whose torch sees no CUDA device (it would run on the CPU, many times slower)."""


class NonFiniteError(PTIError):
    """A model that produced NaN or inf for an image (half precision overflows); the errors
    table's ``non_finite``."""


class InputError(PTIError, ValueError):
    """An input (image, prompt, parameter) that cannot be used as given."""


class ImageError(InputError):
    """An image that cannot be read or converted to RGB. ``kind`` is what the errors table
    says: ``not_found``, ``access_denied``, ``read_failed`` (still failing after retries),
    ``too_large``, ``not_allowed`` or ``bad_image`` (empty, corrupt, not an image, unusable mode)."""

    def __init__(self, message: str, kind: str = "bad_image"):
        super().__init__(message)
        self.kind = kind


class TooManyFailures(PTIError):
    """A job whose failed rows are more than ``max_failed_fraction`` of its rows. Raised after
    everything is written; ``summary`` is the job's summary, as written beside its outputs."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary

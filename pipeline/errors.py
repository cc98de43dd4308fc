"""The errors the pipeline raises on purpose: each names the input and says what to do."""


class PTIError(Exception):
    """Base of the errors a user can act on."""


class ModelError(PTIError):
    """A checkpoint that cannot be found, reached or loaded."""


class InputError(PTIError, ValueError):
    """An input (image, prompt, parameter) that cannot be used as given."""


class ImageError(InputError):
    """An image that cannot be read or converted to RGB."""

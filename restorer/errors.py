"""The project's exceptions: one base class and a few kinds.

Library code raises these; only ``restorer.cli`` maps them to exit codes. Every message names
the thing at fault (path, key, field) and says what to do about it.
"""


class RestorerError(Exception):
    """Base class of every error this package raises on purpose."""


class SpecError(RestorerError, ValueError):
    """A job spec, flag or config value is invalid (unknown key, wrong type, impossible value)."""


class ModelError(RestorerError):
    """A model or checkpoint cannot be found, is not safetensors, or does not match its spec."""


class StorageError(RestorerError):
    """A path or URI cannot be listed, read or written (missing, no access, bad credentials)."""


class ImageError(RestorerError):
    """One image cannot be decoded, restored or encoded; becomes a per-image error record."""


class JobError(RestorerError):
    """A job cannot start or resume as asked (e.g. its output belongs to a different job)."""


class NotFoundError(StorageError, SpecError):
    """A named input, output, model or data folder does not exist (a usage error: exit 2)."""


class UnknownModelError(ModelError, SpecError):
    """A model name is neither bundled nor a file (a usage error: exit 2)."""


class OutputConflictError(JobError, SpecError):
    """The output holds another job (other settings, a live job): a usage error, exit 2."""


class JobStopped(RestorerError):
    """A job was asked to stop (SIGTERM, ``restorer jobs stop``) and drained; rerun to resume."""

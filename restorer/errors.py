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


class LeaseLostError(JobError):
    """Another job took this job's output lease (a takeover after a missed heartbeat): this
    job stops committing at once and fails (exit 1), naming the new holder."""


class JobStopped(RestorerError):
    """A job was asked to stop (SIGTERM, ``restorer jobs stop``) and drained; rerun to resume.
    ``summary``: the stopped run's summary, as written to ``summary.json``."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


class TransientError(RestorerError):
    """A fault that may pass by itself (storage throttling, 5xx, timeouts, dropped connections,
    a device error): retried, and never quarantines an image. Still failing after the retries,
    the image's unit is left uncommitted and the job ends ``incomplete`` (exit 5)."""


# --- one classifier for every failure of an image ---------------------------------------------

PERMANENT, TRANSIENT, MISSING = "permanent", "transient", "missing"

# Names of exception classes (anywhere in an error's class hierarchy or cause chain) that mean
# "the connection or the service failed, not the bytes": botocore, aiohttp, urllib3, asyncio.
_TRANSIENT_CLASS_NAMES = frozenset({
    "ConnectionError", "TimeoutError", "EndpointConnectionError", "ConnectionClosedError",
    "ReadTimeoutError", "ConnectTimeoutError", "ProxyConnectionError", "HTTPClientError",
    "IncompleteRead", "IncompleteReadError", "ResponseParserError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ServerTimeoutError",
    "FSTimeoutError", "NoCredentialsError", "CredentialRetrievalError", "ActorDiedError",
    "RayActorError", "ActorUnavailableError", "OutOfMemoryError", "AcceleratorError",
})
# S3 error codes of a busy, failing or misconfigured service, and the errnos s3fs turns them into.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError", "ExpiredToken",
    "ExpiredTokenException", "TokenRefreshRequired",
})
_TRANSIENT_ERRNOS = frozenset({16, 110, 104, 32, 111, 113, 121,  # EBUSY ETIMEDOUT ECONNRESET
                               # EPIPE ECONNREFUSED EHOSTUNREACH EREMOTEIO; and a full, failing
                               # or stale disk: ENOSPC EDQUOT EIO ESTALE ENOMEM
                               28, 122, 5, 116, 12})
# Words of a device or allocator failure (torch raises these as RuntimeError): the memory or the
# device failed, not the image. Compared lower-cased.
_TRANSIENT_MESSAGES = ("cuda error", "cuda out of memory", "cudnn error", "cudnn_status",
                       "cublas_status", "defaultcpuallocator", "can't allocate memory",
                       "out of memory", "not enough memory", "std::bad_alloc")


def classify(error: BaseException) -> str:
    """How to treat a failure: :data:`PERMANENT` (the bytes are bad: quarantine the image),
    :data:`TRANSIENT` (retry; if it persists, leave the unit for the next run) or
    :data:`MISSING` (the input is gone: retried for a few runs, then quarantined).

    The error, its class hierarchy and its ``__cause__``/``__context__`` chain are read, so a
    :class:`StorageError` raised ``from`` a dropped connection counts as transient. So are
    memory errors (``MemoryError``, ``torch.OutOfMemoryError``, the CPU allocator's "can't
    allocate memory"), device errors (CUDA, cuDNN, cuBLAS) and a full, failing or stale disk
    (``ENOSPC``, ``EDQUOT``, ``EIO``, ``ESTALE``): every stage uses this one classifier, and
    a transient fault that repeats for one image in ``limits.transient_runs`` runs is
    quarantined by the driver (:func:`restorer.pipeline.driver._close_unit`).
    """
    seen: set[int] = set()
    chain: BaseException | None = error
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, TransientError):
            return TRANSIENT
        if isinstance(chain, FileNotFoundError):
            return MISSING
        if {c.__name__ for c in type(chain).__mro__} & _TRANSIENT_CLASS_NAMES:
            return TRANSIENT
        if isinstance(chain, OSError) and chain.errno in _TRANSIENT_ERRNOS:
            return TRANSIENT
        response = getattr(chain, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in ("NoSuchKey", "404", "NotFound"):
                return MISSING
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TRANSIENT
        if isinstance(chain, MemoryError):
            return TRANSIENT
        if isinstance(chain, RuntimeError) and any(words in str(chain).lower()
                                                   for words in _TRANSIENT_MESSAGES):
            return TRANSIENT
        chain = chain.__cause__ or chain.__context__
    return PERMANENT


def is_device_fatal(error: BaseException) -> bool:
    """Whether ``error`` is a CUDA error that leaves the process's device context unusable
    (illegal access, ECC, launch failure: anything but out-of-memory): the actor must go."""
    text = str(error)
    return ((type(error).__name__ == "AcceleratorError" or "CUDA error" in text)
            and "out of memory" not in text)


def backoff_delays(attempts: int, base: float = 0.5, cap: float = 8.0,
                   rng=None) -> list[float]:
    """Waits before each retry of ``attempts`` tries in all: exponential ("full jitter", as
    botocore's): a uniform draw in ``[0, min(cap, base * 2**i)]`` for retry ``i``."""
    import random

    draw = (rng or random).random
    return [draw() * min(cap, base * 2 ** i) for i in range(max(0, attempts - 1))]


def retrying(call, attempts: int = 4, base: float = 0.5, cap: float = 8.0,
             what: str = "", sleep=None):
    """``call()``, retried on :data:`TRANSIENT` failures with exponential backoff and jitter,
    ``attempts`` tries in all; returns ``(result, retries)``. A permanent or missing failure,
    or a transient one on the last try, is raised with ``retries`` (the retries made) set on
    it as ``error.retries``."""
    import logging
    import time

    delays = backoff_delays(attempts, base, cap)
    for retry in range(attempts):
        try:
            return call(), retry
        except Exception as e:  # classified here; permanent ones are re-raised
            e.retries = retry
            if retry == attempts - 1 or classify(e) != TRANSIENT:
                raise
            logging.getLogger(__name__).info("%s: %s: %s; retry %d of %d in %.1f s", what,
                                             type(e).__name__, e, retry + 1, attempts - 1,
                                             delays[retry])
            (sleep or time.sleep)(delays[retry])
    raise AssertionError("unreachable")

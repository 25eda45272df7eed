"""Submitting job specs to a Ray cluster through its Jobs API, and watching them there.

A submitted job's driver runs ``python -m restorer run SPEC`` in a working directory that holds
the resolved spec (flag overrides applied, relative paths made absolute, as TOML) and, when the
model is a local file outside the zoo, that file under ``models/``. This package travels with it
(``py_modules``), so the cluster needs Ray and restorer's dependencies but not restorer itself;
``pip`` installs requirements on bare clusters.

Everything that can be checked on this machine is checked before anything is submitted: the spec
is loaded, overridden and validated, and the model is resolved and loaded, as the driver will do
it. Relative local paths are made absolute against this process's working directory (the driver
runs in a temporary directory), which suits a one-machine cluster or a shared file system; on
other clusters use ``s3://`` URIs.

Addresses are the dashboard's HTTP address, e.g. ``http://127.0.0.1:8265`` (``HOST:PORT``
means ``http://HOST:PORT``); the default is ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``. An
address given here always wins over those variables, unlike in Ray's own client.

Token authentication: the token is read from ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own order), and sent as the bearer
token in the ``Authorization`` header that Ray 2.60's dashboard checks; so submitting works
whatever ``RAY_AUTH_MODE`` this process has. The token is never logged or put in messages.

Size: the Jobs API client, its authentication and the follow loop: one conversation with the
cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restorer.errors import JobError, SpecError
from restorer.io import storage
from restorer.job import specs

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # restorer/, shipped with every job

# How long to wait for a TCP connection to the dashboard before calling it unreachable; Ray's
# client itself waits forever on an address that drops packets.
CONNECT_TIMEOUT_S = 10.0

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# Flags that may override a submitted spec: those of `restorer run`, less --address (the job
# always runs on the cluster it is submitted to).
SUBMIT_OVERRIDES = tuple(name for name in specs.OVERRIDES if name != "address")

_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class ClusterError(JobError):
    """The Jobs API cannot be reached at the given address, or answered with an error."""


class AuthError(ClusterError):
    """The cluster wants a token and none was found, or it rejected the token sent."""


@dataclass(frozen=True)
class SubmittedJob:
    """One job as the Jobs API reports it."""

    job_id: str  # the submission ID, e.g. "restore-small-1a2b3c4d"
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str
    entrypoint: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    driver_exit_code: int | None  # the exit code of `restorer run` once it has ended
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


def dashboard_url(address: str | None = None) -> str:
    """The dashboard's URL (also the Jobs API's) for ``address``, default from the environment.

    ``http://`` and ``https://`` addresses are kept; ``HOST:PORT`` becomes ``http://HOST:PORT``.
    Ray Client (``ray://``) and ``auto`` addresses are refused: they are for ``ray.init``.
    """
    if not address:
        address = next((os.environ[n] for n in _ADDRESS_VARIABLES if os.environ.get(n)), "")
    if not address:
        raise ClusterError("No Ray cluster address: pass the dashboard's address, e.g. "
                           "--address http://127.0.0.1:8265, or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    if address.startswith(("http://", "https://")):
        return address
    if "://" in address or address == "auto" or ":" not in address:
        raise ClusterError(f"{address!r} is not the address of a Ray dashboard; give its HTTP "
                           "address, e.g. http://127.0.0.1:8265 (ray:// and 'auto' are "
                           "addresses for ray.init, not for the Jobs API)")
    return f"http://{address}"


def _token() -> tuple[str, str] | None:
    """(token, where it came from) in Ray's order, or None; the token itself is never logged."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as e:
            raise AuthError(f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read "
                            f"({e.strerror}); point it at a file holding the cluster's token, "
                            "or unset it") from None
        if not token:
            raise AuthError(f"RAY_AUTH_TOKEN_PATH names {path}, which is empty; put the "
                            "cluster's token in it, or unset it")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        token = default.read_text(encoding="utf-8").strip()
        if token:
            return token, str(default)
    return None


class _Client:
    """A connected ``JobSubmissionClient`` with Ray's errors turned into ours."""

    def __init__(self, address: str | None):
        from ray.job_submission import JobSubmissionClient

        self.url = dashboard_url(address)
        found = _token()
        self.token_source = found[1] if found else None
        headers = {"Authorization": f"Bearer {found[0]}"} if found else {}
        self._check_reachable()
        if found and self.url.startswith("http://") and not _is_loopback(self.url):
            log.warning("sending the Ray token over plain HTTP to %s; reach remote clusters "
                        "through an SSH tunnel to 127.0.0.1 (or HTTPS) instead", self.url)
        # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
        # given; hide them while it is built so that an explicit address is the one used.
        with self._errors(), _without_address_variables():
            self.client = JobSubmissionClient(self.url, headers=headers)

    def _check_reachable(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
                pass
        except (OSError, ValueError) as e:
            raise ClusterError(
                f"Cannot reach the Ray Jobs API at {self.url} ({e}). Check that the head is "
                "running, that this is the dashboard's port (8265 by default, not the GCS "
                "port 6379) and that any SSH tunnel is up") from None

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            if self.token_source is None:
                raise AuthError(
                    f"The Ray cluster at {self.url} requires a token and none was found: put "
                    "the cluster's token (`ray get-auth-token` on the head) in a file readable "
                    "only by you and set RAY_AUTH_TOKEN_PATH to it, or use ~/.ray/auth_token"
                ) from None
            raise AuthError(
                f"The Ray cluster at {self.url} rejected the token from {self.token_source}: "
                "it is not this cluster's token. Use the token the head was started with "
                "(`ray get-auth-token` on the head)") from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientError) as e:
            raise ClusterError(f"Lost the connection to the Ray Jobs API at {self.url}: {e}. "
                               "Check that the head is still running") from None
        except RuntimeError as e:
            if job_id and "status code 404" in str(e):
                raise JobError(f"No job {job_id!r} at {self.url}; `restorer jobs list` lists "
                               "the jobs there") from None
            raise ClusterError(f"The Ray Jobs API at {self.url} refused the request: {e}"
                               ) from None

    def info(self, job_id: str) -> SubmittedJob:
        with self._errors(job_id):
            return _job_from_details(self.client.get_job_info(job_id))


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _without_address_variables() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in _ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _job_from_details(details: Any) -> SubmittedJob:
    def seconds(ms: int | None) -> float | None:
        return ms / 1000 if ms else None

    return SubmittedJob(
        job_id=details.submission_id or details.job_id or "",
        status=str(details.status),
        message=details.message or "",
        entrypoint=details.entrypoint or "",
        start_time=seconds(details.start_time),
        end_time=seconds(details.end_time),
        driver_exit_code=details.driver_exit_code,
        metadata=dict(details.metadata or {}),
    )


# Spec fields that may name local files or folders, by kind. Relative ones are made absolute
# before submitting, since the driver runs in a temporary directory on the cluster.
PATH_FIELDS = {
    "restore": (("input", "uri"), ("output", "uri")),
    "train": (("data", "uri"), ("data", "val_uri"), ("output", "storage_path")),
}
# The field naming the model a job starts from (a zoo name, path or URI), by kind.
MODEL_FIELDS = {"restore": ("model", "name"), "train": ("output", "init")}


@dataclass(frozen=True)
class _Prepared:
    spec: Any  # validated, overridden, with absolute paths: what the driver runs
    model_uri: str  # the model on this machine; "" when the job starts from none
    model_sha256: str
    shipped_model: str  # "models/NAME": a local model file shipped in the working dir; or ""


def _is_relative_path(uri: str) -> bool:
    return bool(uri) and not storage.is_remote(uri) and not os.path.isabs(storage.local_path(uri))


def _prepare(spec_path: Path, overrides: dict[str, Any]) -> _Prepared:
    """Load, override and validate the spec and load its model, as the driver will."""
    from restorer.launch.local import load_spec
    from restorer.weights.checkpoint import load_model_bytes
    from restorer.weights.zoo import bundled, resolve_model_uri

    unknown = sorted(set(overrides) - set(SUBMIT_OVERRIDES))
    if unknown:
        raise SpecError(f"{unknown} cannot be overridden when submitting; allowed: "
                        f"{list(SUBMIT_OVERRIDES)} (the job runs on the cluster it is "
                        "submitted to)")
    spec = specs.apply_overrides(load_spec(spec_path), **overrides)
    spec = specs.replace_field(spec, "resources", "address", "")  # the cluster it runs on
    for section, name in PATH_FIELDS.get(spec.kind, ()):
        value = getattr(getattr(spec, section), name)
        if _is_relative_path(value):
            absolute = os.path.abspath(storage.local_path(value))
            log.info("%s.%s = %r is relative: submitting it as %s, which must exist on the "
                     "cluster's nodes", section, name, value, absolute)
            spec = specs.replace_field(spec, section, name, absolute)
    spec = spec.validate()

    if spec.kind not in MODEL_FIELDS:
        return _Prepared(spec, "", "", "")
    section, name = MODEL_FIELDS[spec.kind]
    model = getattr(getattr(spec, section), name)
    if not model and spec.kind != "restore":  # only restore jobs have a default model
        return _Prepared(spec, "", "", "")
    model_uri = resolve_model_uri(model or None)
    data = storage.read_bytes(model_uri, spec.storage.options())
    load_model_bytes(data, model_uri)  # fail here, not on the cluster, if it is unusable
    shipped = ""
    if model and model not in bundled() and not storage.is_remote(model_uri):
        shipped = f"models/{Path(storage.local_path(model_uri)).name}"
        spec = specs.replace_field(spec, section, name, shipped)
    return _Prepared(spec, model_uri, hashlib.sha256(data).hexdigest(), shipped)


def _toml_value(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # JSON strings, numbers and booleans are valid TOML


def spec_toml(spec: Any) -> str:
    """The spec as TOML that :func:`restorer.job.specs.load_spec` reads back to an equal spec."""
    def table(data: dict[str, Any], name: str) -> list[str]:
        lines = [f"[{name}]"] if name else []
        lines += [f"{key} = {_toml_value(value)}" for key, value in data.items()
                  if value is not None and not isinstance(value, dict)]
        for key, value in data.items():
            if isinstance(value, dict):
                lines += ["", *table(value, f"{name}.{key}" if name else key)]
        return lines

    return "\n".join(table(specs.spec_to_dict(spec), "")) + "\n"


def _metadata(spec_path: Path, prepared: _Prepared) -> dict[str, str]:
    """What `jobs list` shows about a job: labels and digests only, never credentials."""
    spec = prepared.spec
    metadata = {
        "restorer_version": importlib.metadata.version("restorer"),
        "spec": spec_path.name,
        "name": spec.name or spec_path.stem,
        "kind": spec.kind,
        "spec_sha256": specs.sha256_of(specs.spec_to_dict(spec)),
    }
    if prepared.model_uri:
        from restorer.weights.zoo import DEFAULT_MODEL

        section, name = MODEL_FIELDS[spec.kind]
        model = getattr(getattr(spec, section), name)
        metadata["model"] = (str(Path(storage.local_path(prepared.model_uri)).resolve())
                             if prepared.shipped_model else model or DEFAULT_MODEL)
        metadata["model_sha256"] = prepared.model_sha256
    if hasattr(spec, "fingerprint"):
        metadata["fingerprint"] = specs.sha256_of(spec.fingerprint(prepared.model_sha256))
    for section, name in PATH_FIELDS.get(spec.kind, ()):
        value = getattr(getattr(spec, section), name)
        if value:
            metadata[f"{section}.{name}"] = value
    return metadata


def _submission_id(label: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "job"
    return f"{slug}-{secrets.token_hex(4)}"


def submit(spec_path: str | Path, address: str | None = None,
           overrides: dict[str, Any] | None = None, follow: bool = False,
           pip: list[str] | None = None, entrypoint_num_cpus: float = 0.5,
           stop_grace_s: int = 60, write: Callable[[str], Any] | None = None) -> str:
    """Submit the job in ``spec_path`` to the cluster at ``address``; returns its job ID.

    The job's working directory holds the resolved spec (overrides applied, paths absolute)
    and, when the model is a local file outside the zoo, that file; its driver runs
    ``python -m restorer run SPEC`` there.

    Args:
        spec_path: a TOML job spec (see ``jobs/README.md``), of any kind.
        address: the dashboard's address; default ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``.
        overrides: flag values by name (those of :data:`SUBMIT_OVERRIDES`; ``None`` = unset).
        follow: stream the job's logs to ``write`` until it ends (then see :func:`job_status`).
        pip: requirements to install on the cluster first, for clusters without restorer's
            dependencies (Ray's ``pip`` runtime environment).
        entrypoint_num_cpus: CPUs reserved for the driver, which coordinates and commits work
            but holds no GPU. Reserving any resource also hides every GPU from the driver;
            0 lets Ray pin the driver to the head node instead, unreserved.
        stop_grace_s: seconds a stopped job has, after SIGTERM, to commit its finished work
            units before it is killed (``RAY_JOB_STOP_WAIT_TIME_S``).
        write: where ``follow`` sends log chunks; default: this module's logger.

    Raises:
        SpecError, ModelError, StorageError: the spec or model is bad; nothing was submitted.
        ClusterError, AuthError: the Jobs API cannot be reached or refused the token.
    """
    spec_path = Path(spec_path)
    prepared = _prepare(spec_path, {k: v for k, v in (overrides or {}).items() if v is not None})
    connection = _Client(address)
    metadata = _metadata(spec_path, prepared)
    entrypoint = shlex.join(["python", "-m", "restorer", "run", spec_path.name])
    runtime_env: dict[str, Any] = {
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__/", "*.pyc"],
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s))},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    with tempfile.TemporaryDirectory(prefix="restorer-submit-") as bundle:
        (Path(bundle) / spec_path.name).write_text(spec_toml(prepared.spec), encoding="utf-8")
        if prepared.shipped_model:
            target = Path(bundle) / prepared.shipped_model
            target.parent.mkdir(parents=True)
            shutil.copyfile(storage.local_path(prepared.model_uri), target)
        runtime_env["working_dir"] = bundle
        with connection._errors():
            job_id = connection.client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                submission_id=_submission_id(metadata["name"]),
                entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=0)
    log.info("submitted %s as job %s to %s", spec_path, job_id, connection.url)
    if follow:
        _follow(connection, job_id, write)
    return job_id


def list_jobs(address: str | None = None) -> list[SubmittedJob]:
    """Every job submitted to the cluster (not drivers started by hand), oldest first."""
    connection = _Client(address)
    with connection._errors():
        details = connection.client.list_jobs()
    found = [_job_from_details(d) for d in details if d.submission_id]
    return sorted(found, key=lambda job: job.start_time or 0.0)


def job_status(address: str | None, job_id: str) -> SubmittedJob:
    """The job's status, with its message, times, exit code and metadata."""
    return _Client(address).info(job_id)


def job_logs(address: str | None, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's log: one chunk with everything so far, or (``follow``) chunks until it ends.

    Connection, token and unknown-job errors are raised here, before the first chunk.
    """
    connection = _Client(address)
    connection.info(job_id)
    if follow:
        return _tail(connection, job_id)
    with connection._errors(job_id):
        return iter([connection.client.get_job_logs(job_id)])


def _tail(connection: _Client, job_id: str) -> Iterator[str]:
    """Run Ray's async ``tail_job_logs`` on a private event loop, one chunk at a time."""
    stream = connection.client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            with connection._errors(job_id):
                try:
                    chunk = loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(stream.aclose())
        loop.close()


def _follow(connection: _Client, job_id: str, write: Callable[[str], Any] | None,
            settle_s: float = 30.0) -> SubmittedJob:
    write = write or (lambda chunk: log.info("%s", chunk.rstrip("\n")))
    for chunk in _tail(connection, job_id):
        write(chunk)
    # The log stream closes when the driver exits; the status may trail it by a moment.
    return _wait(connection, job_id, settle_s)


def _wait(connection: _Client, job_id: str, seconds: float) -> SubmittedJob:
    """The job's state once it has ended, or after ``seconds``, whichever comes first."""
    deadline = time.monotonic() + seconds
    job = connection.info(job_id)
    while not job.finished and time.monotonic() < deadline:
        time.sleep(0.5)
        job = connection.info(job_id)
    return job


def follow(address: str | None, job_id: str, write: Callable[[str], Any] | None = None
           ) -> SubmittedJob:
    """Stream the job's logs to ``write`` until it ends; returns its final state.

    ``write`` gets each chunk of log text as it arrives (default: this module's logger).
    """
    connection = _Client(address)
    connection.info(job_id)
    return _follow(connection, job_id, write)


def stop_job(address: str | None, job_id: str, wait: float = 0.0) -> SubmittedJob:
    """Ask the job to stop (SIGTERM to its driver, which commits finished work units).

    With ``wait`` > 0, waits up to that many seconds for it to end. Returns its latest state;
    stopping a job that has already ended changes nothing.
    """
    connection = _Client(address)
    connection.info(job_id)
    with connection._errors(job_id):
        connection.client.stop_job(job_id)
    return _wait(connection, job_id, wait)


__all__ = ["MODEL_FIELDS", "PATH_FIELDS", "SUBMIT_OVERRIDES", "AuthError", "ClusterError",
           "SubmittedJob", "dashboard_url", "follow", "job_logs", "job_status", "list_jobs",
           "spec_toml", "stop_job", "submit"]

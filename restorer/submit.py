"""Submitting job specs to a Ray cluster through its Jobs API, and watching them there.

A submitted job runs ``python -m restorer run SPEC [--flag value ...]`` as its driver, in a
runtime environment that ships this package (``py_modules``) and a small working directory
holding the spec (and the model file, when the model is a local file outside the zoo). So the
cluster needs Ray and restorer's dependencies, not a checkout; ``pip`` installs extra
requirements on bare clusters.

Everything that can be checked on this machine is checked before anything is submitted: the spec
is loaded, overridden and validated, and the model is resolved and loaded, exactly as the
driver will do it. Relative local paths in the spec are made absolute here (a job runs in a
temporary directory on the cluster), which suits a one-machine cluster or a shared file system;
on other clusters use ``s3://`` URIs.

Addresses are the dashboard's HTTP address, e.g. ``http://127.0.0.1:8265`` (``HOST:PORT``
means ``http://HOST:PORT``); the default is ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``. An
address given here always wins over those variables, unlike in Ray's own client.

Token authentication: the token is read from ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own order), and sent as the bearer
token in the ``Authorization`` header that Ray 2.60's dashboard checks; so submitting works
whatever ``RAY_AUTH_MODE`` this process has. The token is never logged or put in messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
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

from restorer import jobs, storage
from restorer.errors import JobError, SpecError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent

# How long to wait for a TCP connection to the dashboard before calling it unreachable; Ray's
# client itself waits forever on an address that drops packets.
CONNECT_TIMEOUT_S = 10.0

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# Flags that may override a submitted spec: those of `restorer run`, less --address (the job
# always runs on the cluster it is submitted to).
SUBMIT_OVERRIDES = tuple(name for name in jobs.OVERRIDES if name != "address")

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


@dataclass(frozen=True)
class _Prepared:
    spec: Any  # the validated spec, as the driver will see it
    flags: dict[str, Any]  # `restorer run` overrides for the entrypoint
    model_uri: str  # the model on this machine ("" for kinds without one)
    model_sha256: str
    shipped_model: str  # path of the model file inside the working dir, or ""


def _local_relative(uri: str) -> bool:
    return bool(uri) and not storage.is_remote(uri) and not os.path.isabs(storage.local_path(uri))


def _prepare(spec_path: Path, overrides: dict[str, Any], working_dir: Path | None) -> _Prepared:
    """Load, override and validate the spec and load its model, as the driver will."""
    import hashlib

    unknown = sorted(set(overrides) - set(SUBMIT_OVERRIDES))
    if unknown:
        raise SpecError(f"{unknown} cannot be overridden when submitting; allowed: "
                        f"{list(SUBMIT_OVERRIDES)} (the job runs on the cluster it is "
                        "submitted to)")
    flags = {k: v for k, v in overrides.items() if v is not None}
    spec = jobs.apply_overrides(jobs.load_spec(spec_path), **flags)
    for flag in ("input", "output"):
        section, name = jobs.OVERRIDES[flag]
        value = getattr(getattr(spec, section, None), name, None)
        if isinstance(value, str) and _local_relative(value):
            flags[flag] = os.path.abspath(storage.local_path(value))
            log.info("%s.%s %r is relative: submitting it as %s, which must exist on the "
                     "cluster's nodes", section, name, value, flags[flag])
    resources = getattr(spec, "resources", None)
    if resources is not None and getattr(resources, "address", ""):
        flags["address"] = ""  # connect to the cluster the driver runs on, via RAY_ADDRESS
    spec = jobs.apply_overrides(spec, **flags)
    if hasattr(spec, "validate"):
        spec = spec.validate()

    model_uri = sha256 = shipped = ""
    if hasattr(spec, "model"):
        from restorer.checkpoint import load_model_bytes
        from restorer.models import resolve_model_uri, zoo

        options = spec.storage.options() if hasattr(spec, "storage") else storage.StorageOptions()
        name = spec.model.name
        model_uri = resolve_model_uri(name or None)
        data = storage.read_bytes(model_uri, options)
        load_model_bytes(data, model_uri)  # fail here, not on the cluster, if it is unusable
        sha256 = hashlib.sha256(data).hexdigest()
        if name and name not in zoo() and not storage.is_remote(model_uri):
            local = Path(storage.local_path(model_uri)).resolve()
            if working_dir is None:
                shipped = f"models/{local.name}"
                flags["model"] = shipped
            elif local.is_relative_to(working_dir):
                flags["model"] = local.relative_to(working_dir).as_posix()
            else:
                flags["model"] = str(local)
                log.warning("model %s is outside the working directory %s and is not shipped; "
                            "it must exist on the cluster's nodes", local, working_dir)
    return _Prepared(spec, flags, model_uri, sha256, shipped)


def _entrypoint(spec_name: str, flags: dict[str, Any]) -> str:
    words = ["python", "-m", "restorer", "run", spec_name]
    for name, value in flags.items():
        words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def _metadata(spec_path: Path, prepared: _Prepared) -> dict[str, str]:
    """What `jobs list` shows about a job: labels and digests only, never credentials."""
    spec = prepared.spec
    metadata = {
        "restorer_version": importlib.metadata.version("restorer"),
        "spec": spec_path.name,
        "name": getattr(spec, "name", "") or spec_path.stem,
        "kind": spec.kind,
        "spec_sha256": jobs.digest(jobs.spec_to_dict(spec)),
    }
    if prepared.model_uri:
        metadata["model"] = spec.model.name or prepared.model_uri
        metadata["model_sha256"] = prepared.model_sha256
    if hasattr(spec, "fingerprint"):
        metadata["fingerprint"] = jobs.digest(spec.fingerprint(prepared.model_sha256))
    for section in ("input", "output"):
        uri = getattr(getattr(spec, section, None), "uri", None)
        if uri:
            metadata[section] = uri
    return metadata


def _submission_id(label: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "job"
    return f"{slug}-{secrets.token_hex(4)}"


def submit(spec_path: str | Path, address: str | None = None,
           overrides: dict[str, Any] | None = None, follow: bool = False,
           working_dir: str | Path | None = None, pip: list[str] | None = None,
           entrypoint_num_cpus: float = 0.5, stop_grace_s: int = 60,
           write: Callable[[str], Any] | None = None) -> str:
    """Submit the job in ``spec_path`` to the cluster at ``address``; returns its job ID.

    Args:
        spec_path: a TOML job spec (see ``jobs/README.md``).
        address: the dashboard's address; default ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``.
        overrides: flag values by name (those of :data:`SUBMIT_OVERRIDES`; ``None`` = unset).
        follow: stream the job's logs to ``write`` until it ends (then see :func:`job_status`).
        working_dir: a local folder shipped as the job's working directory, holding the spec;
            default: a temporary folder with only the spec (and a local model file).
        pip: requirements to install on the cluster first, for clusters without restorer's
            dependencies (Ray's ``pip`` runtime environment).
        entrypoint_num_cpus: CPUs reserved for the driver. Reserving any resource hides every
            GPU from the driver (it only coordinates; the actors hold GPUs); 0 lets Ray pin the
            driver to the head node instead, unreserved.
        stop_grace_s: seconds a stopped job has, after SIGTERM, to commit its finished work
            units before it is killed (``RAY_JOB_STOP_WAIT_TIME_S``).
        write: where ``follow`` sends log chunks; default: this module's logger.

    Raises:
        SpecError, ModelError, StorageError: the spec or model is bad; nothing was submitted.
        ClusterError, AuthError: the Jobs API cannot be reached or refused the token.
    """
    spec_path = Path(spec_path)
    root = Path(working_dir).resolve() if working_dir is not None else None
    if root is not None:
        if not root.is_dir():
            raise SpecError(f"Working directory {working_dir} is not a folder")
        if not spec_path.resolve().is_relative_to(root):
            raise SpecError(f"Job spec {spec_path} is outside the working directory "
                            f"{working_dir}; the driver reads the spec from there")
    prepared = _prepare(spec_path, dict(overrides or {}), root)
    connection = _Client(address)
    metadata = _metadata(spec_path, prepared)
    runtime_env: dict[str, Any] = {
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__/", "*.pyc"],
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s))},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    with tempfile.TemporaryDirectory(prefix="restorer-submit-") as bundle:
        if root is None:
            spec_name = spec_path.name
            shutil.copyfile(spec_path, Path(bundle) / spec_name)
            if prepared.shipped_model:
                target = Path(bundle) / prepared.shipped_model
                target.parent.mkdir(parents=True)
                shutil.copyfile(storage.local_path(prepared.model_uri), target)
            runtime_env["working_dir"] = bundle
        else:
            spec_name = spec_path.resolve().relative_to(root).as_posix()
            runtime_env["working_dir"] = str(root)
        entrypoint = _entrypoint(spec_name, prepared.flags)
        with connection._errors():
            job_id = connection.client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                submission_id=_submission_id(metadata["name"]),
                entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=0)
    log.info("submitted %s as job %s to %s: %s", spec_path, job_id, connection.url, entrypoint)
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
    deadline = time.monotonic() + settle_s
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
    deadline = time.monotonic() + wait
    job = connection.info(job_id)
    while not job.finished and time.monotonic() < deadline:
        time.sleep(0.5)
        job = connection.info(job_id)
    return job


__all__ = ["SUBMIT_OVERRIDES", "AuthError", "ClusterError", "SubmittedJob", "dashboard_url",
           "follow", "job_logs", "job_status", "list_jobs", "stop_job", "submit"]

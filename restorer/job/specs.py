"""Job specs: frozen dataclasses loaded from TOML, validated, with unknown keys rejected.

A spec file has ``kind = "restore"`` (:class:`RestoreSpec`) or ``kind = "train"``
(:class:`TrainSpec`) and one table per section below;
``jobs/README.md`` documents every field. ``restorer restore`` and ``restorer train`` build the
same specs from flags, and only the fields in :data:`OVERRIDES` may be overridden by flags.
Specs hold no secrets: credentials stay in the environment.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import posixpath
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restorer.errors import NotFoundError, SpecError
from restorer.io.codec import FORMATS, SUBSAMPLINGS
from restorer.io.storage import IMAGE_EXTENSIONS, StorageOptions

MAX_STRENGTH = 3.0  # model.strength: above 1 only for noise-aware (noise-map) models

@dataclass(frozen=True)
class InputSpec:
    uri: str = ""  # folder, file:// or s3:// prefix, or a manifest file
    layout: str = "auto"  # auto | files | parquet (shards of encoded images) | manifest
    key_column: str = "key"  # parquet shards and manifests: the key column
    bytes_column: str = "bytes"  # parquet shards: the encoded-image column
    uri_column: str = "uri"  # Parquet manifests: the column of image URIs
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # case-insensitive, with the dot
    include: tuple[str, ...] = ()  # fnmatch globs on the relative key; empty = everything
    exclude: tuple[str, ...] = ()
    limit: int = 0  # restore at most this many inputs (in listing order); 0 = all


@dataclass(frozen=True)
class OutputSpec:
    uri: str = ""
    layout: str = "files"  # files (one file per image) | parquet (shards: key, bytes, status)
    format: str = "same"  # same | png | jpeg | webp | tiff
    # JPEG and WebP quality 1..100; 0 = from the source: a JPEG source's quality (read from its
    # quantisation tables) raised by restorer.io.codec.matched_quality, else 95
    jpeg_quality: int = 0
    jpeg_subsampling: str = "same"  # same (a JPEG source's; else 4:4:4) | 4:4:4 | 4:2:2 | 4:2:0
    png_compress_level: int = 3
    overwrite: bool = False  # redo every input even if the ledger says it is done
    retry_failed: bool = False  # redo inputs quarantined by an earlier run


@dataclass(frozen=True)
class ModelSpec:
    name: str = ""  # zoo name or path/URI of a .safetensors model; "" = the default model
    # Tile side in input pixels; 0 = whole images (needs memory!). Raised to 4x the overlap
    # (rounded up to the net's alignment) when smaller, e.g. 448 for a default U-Net, so that
    # tiles do not mostly recompute their neighbours; the fingerprint keeps this value.
    tile: int = 256
    overlap: int = 0  # tile overlap in pixels; 0 = the net's receptive field, rounded up to 8
    precision: str = "auto"  # auto (bf16 on CUDA and bf16 CPUs, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the net in each actor (CUDA; slower start-up)
    # A noise-aware model (restore-default) scales its noise map by it: 0 keeps the grain
    # (compression artifacts still go), 1 removes the noise it measures, up to 3 cleans harder.
    # Other models blend their output with the input: 0..1.
    strength: float = 1.0
    # Blind denoisers: fill clean flat regions (frames, clipped areas) with the image's own
    # noise first, so that the photo beside them is denoised too (restorer.image.flat); auto = for
    # models trained to denoise | on | off
    flat_fill: str = "auto"


@dataclass(frozen=True)
class ResourceSpec:
    address: str = ""  # "" = embedded local Ray; "auto" or ray://host:10001 for a cluster
    workers: int = 0  # restore actors (or train workers); 0 = sized from the cluster
    gpus_per_worker: float = -1.0  # -1 = 1 when the cluster has GPUs else 0; fractions allowed
    cpus_per_worker: float = 0.0  # 0 = sized from the cluster (leaves CPUs for decode/encode)
    threads_per_worker: int = 0  # torch threads in a CPU actor; 0 = the CPUs of its node
    batch_size: int = 16  # images per actor call
    tile_batch: int = 0  # tiles per forward pass; 0 = sized from the device (pixels / memory)
    num_cpus: int = 0  # embedded Ray only: CPUs to use; 0 = all
    object_store_mb: int = 0  # embedded Ray only: object store size; 0 = Ray's default


@dataclass(frozen=True)
class LimitSpec:
    max_pixels: int = 100_000_000  # larger images are quarantined (decompression bombs)
    max_input_mb: int = 512  # larger files are quarantined before they are read
    # An output's lease (one job per output) whose heartbeat is older than this is taken over
    lease_stale_seconds: float = 120.0
    # An image failing transiently (memory, device, disk, storage faults) in this many runs is
    # quarantined, its faults' history in its error record (until then its unit stays open)
    transient_runs: int = 3


@dataclass(frozen=True)
class StorageSpec:
    endpoint_url: str = ""  # S3-compatible endpoint; "" = AWS_ENDPOINT_URL or AWS
    region: str = ""
    anon: bool = False
    # Local input/output paths are on a file system every node of a multi-node cluster mounts
    # at the same path (NFS, a cluster file system); checked at start (restorer.pipeline.runtime)
    shared_filesystem: bool = False

    def options(self) -> StorageOptions:
        return StorageOptions(self.endpoint_url or None, self.region or None, self.anon)


@dataclass(frozen=True)
class RestoreSpec:
    kind: str = "restore"
    name: str = ""  # a label for logs and job metadata
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    limits: LimitSpec = field(default_factory=LimitSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)

    def validate(self) -> RestoreSpec:
        if not self.input.uri:
            raise SpecError("input.uri is empty; give the folder or prefix to restore")
        if not self.output.uri:
            raise SpecError("output.uri is empty; give the folder or prefix to write to")
        if self.input.layout not in ("auto", "files", "parquet", "manifest"):
            raise SpecError(f"input.layout = {self.input.layout!r}; use auto, files, parquet "
                            "or manifest")
        if self.output.layout not in ("files", "parquet"):
            raise SpecError(f"output.layout = {self.output.layout!r}; use files or parquet")
        if self.output.format not in FORMATS:
            raise SpecError(f"output.format = {self.output.format!r}; use one of {FORMATS}")
        if not 0 <= self.output.jpeg_quality <= 100:
            raise SpecError(f"output.jpeg_quality = {self.output.jpeg_quality}; use 1..100, or 0 "
                            "to match a JPEG source's quality")
        if self.output.jpeg_subsampling not in ("same", *SUBSAMPLINGS):
            raise SpecError(f"output.jpeg_subsampling = {self.output.jpeg_subsampling!r}; use "
                            f"same or one of {', '.join(SUBSAMPLINGS)}")
        if not 0 <= self.output.png_compress_level <= 9:
            raise SpecError(f"output.png_compress_level = {self.output.png_compress_level}; "
                            "use 0..9")
        if self.model.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise SpecError(f"model.precision = {self.model.precision!r}; use auto, fp32, bf16 "
                            "or fp16")
        if self.model.flat_fill not in ("auto", "on", "off"):
            raise SpecError(f"model.flat_fill = {self.model.flat_fill!r}; use auto, on or off")
        if not 0.0 <= self.model.strength <= MAX_STRENGTH:
            raise SpecError(f"model.strength = {self.model.strength}; use 0..{MAX_STRENGTH:g} "
                            "(above 1 only with a noise-aware model such as restore-default)")
        if self.model.tile < 0 or self.model.overlap < 0:
            raise SpecError("model.tile and model.overlap must be >= 0")
        if 0 < self.model.tile < 32:
            raise SpecError(f"model.tile = {self.model.tile} is too small; use >= 32 (or 0)")
        resources = self.resources
        if resources.workers < 0 or resources.batch_size < 1 or resources.tile_batch < 0:
            raise SpecError("resources.workers and tile_batch must be >= 0, batch_size >= 1")
        if resources.gpus_per_worker < 0 and resources.gpus_per_worker != -1.0:
            raise SpecError(f"resources.gpus_per_worker = {resources.gpus_per_worker}; use -1 "
                            "(auto), 0 (CPU) or a positive number")
        if self.input.limit < 0:
            raise SpecError(f"input.limit = {self.input.limit}; use 0 (all) or a positive count")
        if self.limits.max_pixels < 1:
            raise SpecError("limits.max_pixels must be >= 1")
        if self.limits.transient_runs < 1:
            raise SpecError(f"limits.transient_runs = {self.limits.transient_runs}; use 1 or "
                            "more (runs an image may fail transiently before its quarantine)")
        return self

    def fingerprint(self, model_sha256: str) -> dict[str, Any]:
        """Every setting that changes output pixels or names (not workers or batch sizes)."""
        return {
            "model_sha256": model_sha256,
            "tile": self.model.tile,
            "overlap": self.model.overlap,
            "precision": self.model.precision,
            "strength": self.model.strength,
            "format": self.output.format,
            "layout": self.output.layout,
            "jpeg_quality": self.output.jpeg_quality,
            "jpeg_subsampling": self.output.jpeg_subsampling,
            "png_compress_level": self.output.png_compress_level,
        }


# --- training specs (kind = "train", run by restorer.train.distributed)
# ------------------------------

TRAIN_DEGRADATIONS = ("noise", "jpeg", "blur", "blind", "sr")


def _default_net() -> dict[str, Any]:
    return {"arch": "dncnn", "channels": 1, "num_features": 32, "num_layers": 12}


@dataclass(frozen=True)
class TrainData:
    uri: str = ""  # clean training images: folder or s3:// prefix
    val_uri: str = ""  # clean validation images, held apart; "" = no validation
    val_images: int = 4  # validate on at most this many images (first in listing order)
    val_crop: int = 256  # centre crop of each validation image, pixels; 0 = whole image


@dataclass(frozen=True)
class Degradation:
    kind: str = "noise"  # noise | jpeg | blur | blind (noise or jpeg, DnCNN-3) | sr (MATLAB
    # bicubic downscale by the net's scale; for super-resolution nets)
    sigma_min: float = 0.0  # Gaussian noise std range, 0-255 scale (blind when min < max)
    sigma_max: float = 55.0
    quality_min: int = 10  # JPEG quality range
    quality_max: int = 40
    blur_min: float = 0.5  # Gaussian blur std range, pixels
    blur_max: float = 2.0
    val_sigma: float = 25.0  # validation: noise std (noise and blind kinds)
    val_quality: int = 20  # validation: JPEG quality (jpeg kind)


@dataclass(frozen=True)
class Optim:
    steps: int = 2000  # optimiser steps in all (a resumed run continues to this count)
    batch_size: int = 32  # patches per step per worker
    patch_size: int = 48
    lr: float = 1e-3  # Adam, cosine-decayed to min_lr
    min_lr: float = 1e-5
    loss: str = "l1"  # l1 | mse
    seed: int = 0
    ema: float = 0.0  # 0 = off; else the decay of an exponential moving average of weights
    precision: str = "auto"  # auto: bf16 autocast + channels_last on CUDA, fp32 on CPU | fp32


@dataclass(frozen=True)
class Validation:
    every: int = 200  # steps between validation + checkpoint
    # also validate + checkpoint when this many seconds passed since the last checkpoint (or
    # the start), so that a slow machine loses little to a crash or Ctrl-C; 0 = by steps only
    every_seconds: float = 120.0


@dataclass(frozen=True)
class Output:
    storage_path: str = "checkpoints"  # local folder or s3:// prefix for runs
    init: str = ""  # fine-tune from this model (zoo name or path); "" = from scratch
    keep: int = 2  # checkpoints kept (the best by validation PSNR and the latest)


@dataclass(frozen=True)
class TrainSpec:
    kind: str = "train"
    name: str = "train"  # the run name: same name + storage path = resume
    net: dict[str, Any] = field(default_factory=_default_net)  # see restorer.nets
    data: TrainData = field(default_factory=TrainData)
    degradation: Degradation = field(default_factory=Degradation)
    optim: Optim = field(default_factory=Optim)
    validation: Validation = field(default_factory=Validation)
    output: Output = field(default_factory=Output)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)

    def validate(self) -> TrainSpec:
        if not self.data.uri:
            raise SpecError("data.uri is empty; give the folder or prefix of clean images")
        if self.degradation.kind not in TRAIN_DEGRADATIONS:
            raise SpecError(f"degradation.kind = {self.degradation.kind!r}; use one of "
                            f"{TRAIN_DEGRADATIONS}")
        if self.optim.precision not in ("auto", "fp32"):
            raise SpecError(f"optim.precision = {self.optim.precision!r}; use auto or fp32")
        if self.optim.loss not in ("l1", "mse"):  # restorer.train.core.LOSSES
            raise SpecError(f"optim.loss = {self.optim.loss!r}; use l1 or mse")
        if self.optim.steps < 1 or self.optim.batch_size < 1 or self.validation.every < 1:
            raise SpecError("optim.steps, optim.batch_size and validation.every must be >= 1")
        if self.validation.every_seconds < 0:
            raise SpecError(f"validation.every_seconds = {self.validation.every_seconds}; use 0 "
                            "(by steps only) or a number of seconds, e.g. 120")
        if not self.name or "/" in self.name:
            raise SpecError(f"name = {self.name!r}; give a run name without '/'")
        from restorer.nets import build_net  # torch: imported when a train spec is checked

        try:
            scale = getattr(build_net(self.net), "scale", 1)
        except Exception as e:  # noqa: BLE001 - report the net spec error as a spec error
            raise SpecError(f"[net]: {e}") from None
        if (scale > 1) != (self.degradation.kind == "sr"):
            raise SpecError(f"the net's scale is {scale} and degradation.kind is "
                            f"{self.degradation.kind!r}: super-resolution nets (scale > 1) "
                            "train with kind = \"sr\", and only they do")
        if scale > 1 and self.optim.patch_size % scale:
            raise SpecError(f"optim.patch_size = {self.optim.patch_size} must be a multiple of "
                            f"the net's scale {scale}")
        return self



# Fields that command-line flags may override, as flag name -> (section, field).
OVERRIDES = {
    "input": ("input", "uri"),
    "output": ("output", "uri"),
    "model": ("model", "name"),
    "workers": ("resources", "workers"),
    "gpus_per_worker": ("resources", "gpus_per_worker"),
    "limit": ("input", "limit"),
    "address": ("resources", "address"),
    "quality": ("output", "jpeg_quality"),
}


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type annotation, converting lists to tuples."""
    origin = typing.get_origin(annotation)
    if annotation is dict or typing.get_origin(annotation) is dict:
        if not isinstance(value, dict):
            raise SpecError(f"[{where}] must be a table, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise SpecError(f"[{where}] must be a table, got {type(value).__name__}")
        return from_dict(annotation, value, where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        if not isinstance(value, list | tuple):
            raise SpecError(f"{where} must be a list, got {value!r}")
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, where)
            except SpecError:
                continue
        raise SpecError(f"{where} = {value!r} has the wrong type; expected {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not (
            isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))):
        raise SpecError(f"{where} = {value!r} must be of type {annotation.__name__}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table; unknown keys are a ``SpecError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        section = f"[{where}]" if where else "the spec"
        raise SpecError(f"Unknown keys {unknown} in {section}; allowed: {sorted(names)}")
    values = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


def replace_field(spec: Any, section: str, name: str, value: Any) -> Any:
    """A copy of ``spec`` with ``spec.section.name = value`` (type-checked)."""
    part = getattr(spec, section)
    hint = typing.get_type_hints(type(part))[name]
    value = _convert(value, hint, f"{section}.{name}")
    return dataclasses.replace(spec, **{section: dataclasses.replace(part, **{name: value})})


def apply_overrides(spec: Any, **overrides: Any) -> Any:
    """Apply flag overrides (names from :data:`OVERRIDES`; ``None`` values are ignored)."""
    for flag, value in overrides.items():
        if value is None:
            continue
        if flag not in OVERRIDES:
            raise SpecError(f"{flag!r} cannot be overridden by a flag; allowed: "
                            f"{sorted(OVERRIDES)}")
        section, name = OVERRIDES[flag]
        if not hasattr(spec, section) or not hasattr(getattr(spec, section), name):
            raise SpecError(f"A {spec.kind} spec has no {section}.{name} for --{flag}")
        spec = replace_field(spec, section, name, value)
    return spec


def input_from_files(uris: list[str]) -> tuple[str, tuple[str, ...]]:
    """(input.uri, include globs) for the inputs named on a command line.

    One folder, prefix, manifest or file stands as it is (a file is listed alone, under its
    name). Several files become their common folder with one exact include pattern each, so
    they keep their paths below that folder.
    """
    if len(uris) == 1:
        return uris[0], ()
    local = [u for u in uris if "://" not in u or u.startswith("file://")]
    if local and len(local) != len(uris):
        raise SpecError("give several inputs either all local or all in one object store")
    if local:
        paths = [os.path.abspath(u.removeprefix("file://")) for u in uris]
        folders = [p for p in paths if os.path.isdir(p)]
        if folders:
            raise SpecError(f"{folders[0]} is a folder: give one folder, or several files")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise NotFoundError(f"Input {missing[0]} does not exist; check the path")
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        keys = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    else:
        schemes = {u.split("://", 1)[0] for u in uris}
        root = posixpath.commonpath([u.split("://", 1)[1].rpartition("/")[0] for u in uris])
        if len(schemes) != 1 or not root:
            raise SpecError("several object-store inputs must share one bucket")
        keys = [u.split("://", 1)[1][len(root):].lstrip("/") for u in uris]
        root = f"{schemes.pop()}://{root}"
    return root, tuple(glob.escape(k) for k in keys)


def spec_from_flags(cls: type, **values: Any) -> Any:
    """Build a spec from flat flag names (``tile=128, format="png"``), one field per name.

    ``input``/``output``/``model`` name the URIs and the model; every other name must be a field
    of exactly one section, or be qualified by its section (``input_layout``). ``None`` values
    are left at their defaults.
    """
    spec = cls()
    aliases = {"input": ("input", "uri"), "output": ("output", "uri"), "model": ("model", "name")}
    sections = [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.type)
                or dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
    for flag, value in values.items():
        if value is None:
            continue
        qualified = flag.split("_", 1)
        if flag in aliases:
            section, name = aliases[flag]
        elif (len(qualified) == 2 and qualified[0] in sections
              and qualified[1] in {f.name for f in dataclasses.fields(getattr(spec, qualified[0]))}):
            section, name = qualified  # e.g. input_layout, output_layout
        else:
            owners = [s for s in sections if flag in
                      {f.name for f in dataclasses.fields(getattr(spec, s))}]
            if len(owners) != 1:
                raise SpecError(f"Unknown option {flag!r} for a {spec.kind} job")
            section, name = owners[0], flag
        spec = replace_field(spec, section, name, value)
    return spec


SPEC_KINDS: dict[str, type] = {"restore": RestoreSpec, "train": TrainSpec}


def spec_from_dict(data: dict[str, Any], source: str = "spec") -> Any:
    kind = data.get("kind")
    if kind not in SPEC_KINDS:
        raise SpecError(f"{source}: kind = {kind!r}; use one of {sorted(SPEC_KINDS)}")
    try:
        return from_dict(SPEC_KINDS[kind], data)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def load_spec(path: str | Path) -> Any:
    """Read and type-check a TOML job spec (not yet validated against storage or models)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"Job spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"Job spec {path} is not valid TOML: {e}") from None
    return spec_from_dict(data, str(path))


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """The resolved spec as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def sha256_of(data: Any) -> str:
    """The sha256 (hex) of ``data`` as canonical JSON (sorted keys): a spec's or fingerprint's."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

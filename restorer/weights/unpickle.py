"""Reading ``torch.save`` files without running anything from them.

A ``.pth`` file is a pickle, and unpickling calls whatever globals the pickle names; a file saved
with ``torch.save(model)`` (a whole module) names its author's classes, which
``torch.load(weights_only=True)`` refuses and ``weights_only=False`` would import and run. This
module reads both of torch's layouts with a restricted unpickler instead:

- zip (PyTorch >= 1.6): ``<archive>/data.pkl`` plus one record ``<archive>/data/<key>`` per
  storage, whose persistent ids are ``("storage", storage_type, key, location, numel)``;
- legacy (before 1.6): four pickles (magic number, protocol version 1001, sys_info, then the
  main pickle with persistent ids ``("storage", storage_type, key, location, numel,
  view_metadata)`` and ``("module", class, source_file, source)``), the pickled list of storage
  keys, then each storage's raw bytes after its int64 element count.

What a global resolves to:

- tensor rebuilders (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``,
  ``torch.nn.Parameter``) and ``torch.*Storage`` types: our own functions that view the file's
  bytes as tensors;
- ``collections.OrderedDict``, ``set``, ``frozenset``: themselves (plain containers);
- a few callables a module pickle must step over (``torch.nn.backends.thnn.
  _get_thnn_function_backend``, ``torch.device``): inert stand-ins returning an :class:`Inert`;
- any other global (``torch.nn.Conv2d``, the author's ``__main__.DnCNN``): an inert stand-in
  class. Pickle rebuilds an ``nn.Module`` with ``cls.__new__`` and a state dict (NEWOBJ,
  BUILD), which gives an :class:`ObjectRecord` (class name and pickled attributes); *calling*
  the stand-in (REDUCE, the way a pickle runs code) refuses the file, naming the global;
- globals of modules that exist to run code (``os``, ``posix``, ``subprocess``, ``builtins``...):
  refused as soon as they are named.

Nothing from the file is imported or called. Tensors land on the CPU whatever their location.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from restorer.errors import ModelError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}

# Modules whose globals a weights file has no reason to name: a pickle naming one is refused.
CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy",
    "shutil", "socket", "pickle", "_pickle", "marshal", "types", "code", "codeop", "ctypes", "pty",
    "webbrowser", "multiprocessing", "threading", "signal", "io", "_io", "tempfile", "pathlib",
    "operator", "functools", "inspect", "pdb", "timeit", "platform", "asyncio", "urllib", "http",
    "requests", "ftplib", "smtplib", "zipimport", "pkgutil", "site", "sysconfig", "setuptools",
    "distutils", "copyreg", "torch.hub", "torch.jit", "torch._C", "torch.ops",
    "torch.serialization",
})


class UnsafePickleError(ModelError):
    """The pickle names or calls a global that could run code; nothing was run."""

    def __init__(self, qualname: str, called: bool, source: str = "the file"):
        self.qualname, self.called = qualname, called
        super().__init__(
            f"{source} is refused: its pickle {'calls' if called else 'names'} {qualname}, which "
            "could run code; restorer never runs code from a model file, and nothing was run. "
            "Ask its publisher for a state dict or a safetensors file."
        )


@dataclass(frozen=True)
class StorageType:
    name: str  # e.g. "FloatStorage"
    dtype: torch.dtype


@dataclass(frozen=True)
class Inert:
    """What a stepped-over call returned: the global's name and its arguments, nothing run."""
    qualname: str
    args: tuple


class ObjectRecord:
    """An object the pickle rebuilt with ``cls.__new__`` + state: its class and attributes.

    ``qualname`` is the pickled class (``"torch.nn.modules.conv.Conv2d"``); ``state`` the
    pickled ``__dict__`` (for an ``nn.Module``: ``_parameters``, ``_buffers``, ``_modules``,
    ``eps``...).
    """

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        record = object.__new__(cls)
        record.state = {}
        return record

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slot state)
            for part in state:
                if isinstance(part, dict):
                    self.state.update(part)
        elif isinstance(state, dict):
            self.state.update(state)
        else:
            self.state["__state__"] = state

    @property
    def class_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<record of {self.qualname}>"


class _StandIn(type):
    """Metaclass of the stand-in classes: instantiating by ``__new__`` works, calling refuses."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(cls.qualname, called=True)


def _stand_in_class(module: str, name: str) -> type:
    return _StandIn(name, (ObjectRecord,), {"qualname": f"{module}.{name}"})


def _step_over(qualname: str) -> Callable[..., Inert]:
    def stand_in(*args: Any, **kwargs: Any) -> Inert:
        return Inert(qualname, args)
    return stand_in


@dataclass(frozen=True)
class TorchFile:
    obj: Any  # what the main pickle held: tensors, containers, ObjectRecords
    format: str  # "zip" or "legacy"


def read_torch_file(data: bytes, source: str) -> TorchFile:
    """Read a ``torch.save`` file (zip or legacy) without running anything from it.

    Raises :class:`ModelError` (:class:`UnsafePickleError` for pickles that would run code)
    naming ``source``.
    """
    try:
        if data[:4] == b"PK\x03\x04":
            return TorchFile(_read_zip(data), "zip")
        if data[:2] == b"\x80\x02":
            return TorchFile(_read_legacy(data), "legacy")
    except UnsafePickleError as e:
        raise UnsafePickleError(e.qualname, e.called, source) from None
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any malformed pickle or archive
        raise ModelError(f"{source} could not be read as a torch.save file: "
                         f"{type(e).__name__}: {e}") from None
    raise ModelError(f"{source} is neither a zip (PyTorch >= 1.6) nor a legacy torch.save file")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storage: Callable[[StorageType, str, int], torch.Tensor]
                 | None = None):
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, self._classes)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise ModelError(f"unknown persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4 and isinstance(pid[1], _StandIn):
            return pid[1]  # legacy: the module's class, already a stand-in
        if kind != "storage" or len(pid) not in (5, 6) or self._storage is None:
            raise ModelError(f"unknown persistent id {pid[:2]!r}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise ModelError(f"malformed storage id {pid!r}")
        storage = self._storage(storage_type, key, numel)
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy storage views: (view_key, offset, size) into the root
            _, offset, size = view
            if offset < 0 or size < 0 or offset + size > storage.numel():
                raise ModelError(f"storage view {view!r} lies outside storage {key}")
            storage = storage[offset:offset + size]
        return storage


def resolve_global(module: str, name: str, classes: dict[tuple[str, str], type]) -> Any:
    """What the restricted unpickler gives for the global ``module.name`` (see module doc)."""
    # Python 2 names (protocol 2 writes __builtin__.set), mapped the way pickle itself does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    qualname = f"{module}.{name}"
    if module == "builtins" and name in ("set", "frozenset"):
        return set if name == "set" else frozenset
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "torch._utils" and name in _REBUILDERS:
        return _REBUILDERS[name]
    if module == "torch.nn.parameter" and name == "Parameter":
        return _parameter
    if module == "torch" and name in STORAGE_DTYPES:
        return StorageType(name, STORAGE_DTYPES[name])
    if module == "torch" and name == "Size":
        return _size
    if qualname in STEP_OVER:
        return _step_over(qualname)
    root = module.split(".")[0]
    if root in CODE_MODULES or module in CODE_MODULES or any(
            module.startswith(m + ".") for m in CODE_MODULES if "." in m):
        raise UnsafePickleError(qualname, called=False)
    if (module, name) not in classes:
        classes[(module, name)] = _stand_in_class(module, name)
    return classes[(module, name)]


# Callables that a pickled nn.Module calls for attributes nobody needs: stepped over.
STEP_OVER = frozenset({
    "torch.nn.backends.thnn._get_thnn_function_backend",
    "torch.device",
})


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any
                    ) -> torch.Tensor:
    """View ``storage`` (a 1-D tensor read from the file) with torch's (offset, size, stride)."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise ModelError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    ints = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise ModelError(f"malformed tensor: offset {storage_offset}, size {size}, "
                         f"stride {stride}")
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise ModelError(f"tensor of size {size} lies outside its storage of "
                             f"{storage.numel()} elements")
    return storage.as_strided(size, stride, storage.storage_offset() + storage_offset)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _parameter(data: Any = None, requires_grad: bool = True) -> Any:
    return data


def _size(dims: Any = ()) -> tuple:
    return tuple(int(d) for d in dims)


_REBUILDERS: dict[str, Callable[..., Any]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _tensor_from_bytes(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)


def _read_zip(data: bytes) -> Any:
    """The main pickle of a torch zip file; no record is inflated past the size caps
    (:func:`_checked_entries`)."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    _checked_entries(archive, len(data))
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ModelError(f"a torch zip file holds one data.pkl, this one {len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
        raise ModelError("big-endian checkpoints are not supported; re-save it on a "
                         "little-endian machine")
    storages: dict[str, torch.Tensor] = {}

    def storage(storage_type: StorageType, key: str, numel: int) -> torch.Tensor:
        if key not in storages:
            name = f"{prefix}data/{key}"
            nbytes = numel * _element_size(storage_type.dtype)
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise ModelError(f"storage record {name} is missing") from None
            if info.file_size != nbytes:
                raise ModelError(f"storage record {name} holds {info.file_size} bytes, its "
                                 f"pickle says {nbytes}")
            storages[key] = _tensor_from_bytes(archive.read(name), storage_type.dtype)
        if storages[key].dtype != storage_type.dtype:
            raise ModelError(f"storage {key} is read as two dtypes")
        return storages[key]

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), storage).load()


MAX_ZIP_INFLATION = 4  # all records of a torch zip, inflated, at most this times the file
# (torch.save stores its records uncompressed: about 1x); more is a zip bomb
MAX_ZIP_SLACK = 1 << 20  # ... plus this much (tiny files: headers, a small deflated pickle)
MAX_ZIP_ENTRY_BYTES = 8 << 30  # and no one record above 8 GiB, whatever the file's size


def _checked_entries(archive: zipfile.ZipFile, file_size: int) -> None:
    """Refuse an archive whose records would inflate past the caps, from their declared sizes
    (``zipfile`` never inflates a record past its declared size: it stops there, and a record
    whose data does not match fails its CRC)."""
    total = 0
    for info in archive.infolist():
        if info.file_size > MAX_ZIP_ENTRY_BYTES:
            raise ModelError(f"zip record {info.filename} would inflate to {info.file_size:,} "
                             f"bytes, above the {MAX_ZIP_ENTRY_BYTES:,}-byte cap")
        total += info.file_size
    if total > MAX_ZIP_INFLATION * file_size + MAX_ZIP_SLACK:
        raise ModelError(f"its zip records would inflate to {total:,} bytes from a "
                         f"{file_size:,}-byte file, above the cap of {MAX_ZIP_INFLATION}x "
                         "(a zip bomb? torch.save stores its records uncompressed)")


def _read_legacy(data: bytes) -> Any:
    f = io.BytesIO(data)
    if _Unpickler(f).load() != LEGACY_MAGIC:
        raise ModelError("not a torch.save file (wrong magic number)")
    protocol = _Unpickler(f).load()
    if protocol != LEGACY_PROTOCOL:
        raise ModelError(f"legacy torch.save protocol {protocol} is not supported "
                         f"(only {LEGACY_PROTOCOL})")
    sys_info = _Unpickler(f).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ModelError("big-endian checkpoints are not supported; re-save it on a "
                         "little-endian machine")
    roots: dict[str, torch.Tensor] = {}

    def storage(storage_type: StorageType, key: str, numel: int) -> torch.Tensor:
        # The bytes come after the pickle: allocate now, fill in below (tensors are views).
        if key not in roots:
            if numel * _element_size(storage_type.dtype) > len(data):
                raise ModelError(f"storage {key} claims {numel} elements, more than the file")
            roots[key] = torch.zeros(numel, dtype=storage_type.dtype)
        if roots[key].dtype != storage_type.dtype or roots[key].numel() != numel:
            raise ModelError(f"storage {key} is described twice, differently")
        return roots[key]

    obj = _Unpickler(f, storage).load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(roots):
        raise ModelError("the list of storage keys does not match the storages in the pickle")
    for key in map(str, keys):
        root = roots[key]
        numel = int.from_bytes(f.read(8), "little", signed=True)
        if numel != root.numel():
            raise ModelError(f"storage {key} holds {numel} elements, its pickle says "
                             f"{root.numel()}")
        raw = f.read(numel * root.element_size())
        if len(raw) != numel * root.element_size():
            raise ModelError(f"the file ends inside storage {key} (truncated download?)")
        if numel:
            root.view(torch.uint8).copy_(_tensor_from_bytes(raw, torch.uint8))
    return obj


def module_tensors(record: ObjectRecord, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(name, tensor or None)`` for a pickled module, named and ordered as its state dict."""
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if group == "_buffers" and name in skip:
                continue
            yield prefix + name, value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, ObjectRecord):
            yield from module_tensors(child, f"{prefix}{name}.")


def module_leaves(record: ObjectRecord, prefix: str = "") -> Iterator[tuple[str, ObjectRecord]]:
    """``(dotted name, record)`` of a pickled module's leaf modules, in ``_modules`` order."""
    children = [(n, c) for n, c in (record.state.get("_modules") or {}).items()
                if isinstance(c, ObjectRecord)]
    if not children:
        yield prefix.rstrip("."), record
    for name, child in children:
        yield from module_leaves(child, f"{prefix}{name}.")


def is_module_record(obj: Any) -> bool:
    return isinstance(obj, ObjectRecord) and isinstance(obj.state.get("_modules"), dict)


__all__ = [
    "Inert",
    "ObjectRecord",
    "TorchFile",
    "UnsafePickleError",
    "is_module_record",
    "module_leaves",
    "module_tensors",
    "read_torch_file",
]

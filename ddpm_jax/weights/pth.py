"""Safe reader for PyTorch `.pth` state dicts, without torch and without arbitrary unpickling.

`torch.save` writes a pickle whose tensors refer to raw storages by "persistent id". Unpickling
it with `pickle.load` would let the file call any importable function. `load_pth` instead uses a
`pickle.Unpickler` whose `find_class` allows only the handful of globals a state dict needs
(`collections.OrderedDict`, torch's tensor-rebuild functions and storage types), each mapped to a
local function that builds NumPy arrays; any other global raises `UnsafePickleError`.

Both of torch's file formats are read:

- the zip format (torch >= 1.6): `<prefix>/data.pkl` plus one entry `<prefix>/data/<key>` per
  storage;
- the legacy format (`_use_new_zipfile_serialization=False`, and files written by old torch):
  a sequence of pickles (magic number, protocol version, system info, the object, the list of
  storage keys) followed by each storage as an int64 element count and its raw bytes.

`load_state_dict` is `load_pth` for a weights file a user points to: any problem with the file
(missing, damaged, unsafe, not a state dict) raises `ddpm_jax.errors.UsageError` naming it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from ddpm_jax.errors import UsageError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# What reading a damaged or foreign file can raise (truncated pickles and storages, a broken zip
# archive, a pickle whose opcodes hand the allow-listed functions arguments they cannot take).
_DAMAGED_FILE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    AttributeError,
)

# torch storage class name -> NumPy dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file refers to a global that a plain state dict never needs."""


class _StorageType:
    """Stands in for `torch.FloatStorage` etc. inside the pickle: it only carries a dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Local stand-in for torch._utils._rebuild_tensor(_v2): a strided view, copied out."""
    del unused  # requires_grad, backward hooks, metadata: meaningless for NumPy arrays.
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError(f"tensor storage must be a storage, got {storage!r:.100}")
    size, stride = tuple(size), tuple(stride)
    values = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise pickle.UnpicklingError(
            f"invalid tensor size {size!r:.100}, stride {stride!r:.100} or offset "
            f"{storage_offset!r:.100}"
        )
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.shape[0]:
        raise pickle.UnpicklingError(
            f"tensor of size {size} and stride {stride} at offset {storage_offset} overruns its "
            f"storage of {storage.shape[0]} elements"
        )
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride)
    )
    return np.array(view)  # own, contiguous copy


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    del requires_grad, backward_hooks, unused
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and hands storages to `load_storage`."""

    def __init__(self, file, load_storage=None):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: a state dict of tensors only needs "
            f"collections.OrderedDict, torch._utils._rebuild_tensor* and torch *Storage types"
        )

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise pickle.UnpicklingError("unexpected persistent id in a plain pickle")
        if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.100}")
        return self._load_storage(pid[1:])


def _ascii(value):
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_dtype(storage_type) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.100}")
    return storage_type.dtype


def _load_zip(archive: zipfile.ZipFile):
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise pickle.UnpicklingError(f"expected one data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in archive.namelist():
        byteorder = archive.read(prefix + "byteorder").decode().strip()
        if byteorder != "little":
            raise pickle.UnpicklingError(f"unsupported byte order {byteorder!r}")
    storages: dict[str, np.ndarray] = {}

    def load_storage(data):
        storage_type, key, _location, numel = data[:4]
        dtype = _storage_dtype(storage_type)
        key = _ascii(key)
        if key not in storages:
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} is truncated")
            storages[key] = np.frombuffer(raw, dtype, count=numel)
        return storages[key]

    with archive.open(pickles[0]) as f:
        return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


def _load_legacy(f):
    if _RestrictedUnpickler(f).load() != _LEGACY_MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a torch file: invalid magic number")
    version = _RestrictedUnpickler(f).load()
    if version != _LEGACY_PROTOCOL_VERSION:
        raise pickle.UnpicklingError(f"unsupported legacy torch protocol version {version}")
    sys_info = _RestrictedUnpickler(f).load()
    if not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian torch files are not supported")

    # The object pickle refers to storages whose bytes follow it in the file. First pass: note
    # each root storage's dtype and size, then read the storages; second pass: rebuild tensors.
    object_start = f.tell()
    roots: dict[str, tuple[np.dtype, int]] = {}

    def note_storage(data):
        storage_type, root_key, _location, numel, _view_metadata = data
        roots.setdefault(_ascii(root_key), (_storage_dtype(storage_type), numel))
        return np.zeros(numel, _storage_dtype(storage_type))

    _RestrictedUnpickler(f, note_storage).load()
    keys = [_ascii(k) for k in _RestrictedUnpickler(f).load()]
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in roots:
            raise pickle.UnpicklingError(f"storage {key} is not referenced by the object")
        dtype, numel = roots[key]
        (count,) = struct.unpack("<q", f.read(8))
        raw = f.read(count * dtype.itemsize)
        if count != numel or len(raw) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is truncated or has the wrong size")
        arrays[key] = np.frombuffer(raw, dtype)
    if set(roots) - set(arrays):
        raise pickle.UnpicklingError(f"storages {sorted(set(roots) - set(arrays))} are missing")

    def load_storage(data):
        _storage_type, root_key, _location, numel, view_metadata = data
        storage = arrays[_ascii(root_key)]
        if view_metadata is None:
            return storage
        _view_key, offset, size = view_metadata
        return storage[offset : offset + size]

    f.seek(object_start)
    return _RestrictedUnpickler(f, load_storage).load()


def load_pth(path: str):
    """Loads a `torch.save`d object of tensors (e.g. a state dict) as NumPy arrays.

    Args:
        path: a `.pth` / `.pt` file in torch's zip or legacy format.

    Returns:
        The saved object with every tensor replaced by a NumPy array (a state dict becomes an
        `OrderedDict[str, np.ndarray]`); tensors keep their dtype and shape.

    Raises:
        UnsafePickleError: the file refers to a global outside the allow-list (it is not a plain
            state dict, or it is malicious); nothing it names is imported or called.
        pickle.UnpicklingError: the file is not a readable torch file.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _load_zip(archive)
    with open(path, "rb") as f:
        return _load_legacy(f)


def load_state_dict(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """Loads a state dict a user points to; any problem with the file is a `UsageError`.

    `load_pth` plus the checks a user's weights file needs: it exists, reads as a torch file,
    names no global outside the allow-list, and holds a mapping of names to tensors.

    Args:
        path: a `.pth` / `.pt` / `.bin` file written by `torch.save(state_dict)`.

    Returns:
        The state dict: parameter name -> NumPy array with the tensor's dtype and shape, in the
        file's order.

    Raises:
        UsageError: one line naming the file and what is wrong with it (missing, unreadable,
            damaged, unsafe, or not a state dict).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: pass the path of the weights file")
    try:
        state = load_pth(path)
    except UnsafePickleError as e:
        raise UsageError(f"{path} is not a plain state dict and was not loaded: {e}") from e
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({' '.join(str(e).split())})") from e
    except _DAMAGED_FILE_ERRORS as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UsageError(f"{path} is damaged ({reason}): download it again") from e
    if not isinstance(state, Mapping):
        raise UsageError(
            f"{path} holds a {type(state).__name__}, not a state dict (parameter name -> tensor)"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise UsageError(
                f"{path} is not a state dict: its entry {key!r:.60} is a {type(value).__name__}, "
                "not a tensor"
            )
    return state

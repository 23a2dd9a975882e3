"""Read files written by `torch.save` (.ckpt, .pt, .pth, pytorch_model.bin) without torch and without running code.

A torch file is a pickle plus raw tensor bytes. Unpickling with the standard library would import and call
whatever the pickle names (`os.system`, `builtins.eval`, ...), so a downloaded checkpoint could run any code.
This reader replaces every "import" and every "call" the pickle machine makes with an explicit allow-list of
*our own* small functions that only rebuild tensors; anything else is refused with UnsafeCheckpointError.

Two container formats (sd-reference.md §2.5, torch/serialization.py):

  zip (torch >= 1.6, the default): a ZIP archive with one top folder of any name (SD files: `archive/`):
      <folder>/data.pkl        the pickle (protocol 2)
      <folder>/data/<key>      one storage per key: raw bytes, stored uncompressed, 64-byte aligned
      <folder>/byteorder       "little" or "big" (absent in older files: little)
    We find each member's data offset from its local file header and memory-map it, so a 4 GB checkpoint is
    never read into Python bytes. A compressed member (not written by torch) is read and inflated instead.

  legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five things back to back in one file:
      pickle(magic 0x1950a86a20f9469cfc6c) pickle(protocol 1001) pickle(sys_info) pickle(the object)
      pickle([storage keys]) then, per key in that order, [u64 little-endian element count][raw bytes]
    The storage bytes are always little-endian (torch's THPStorage_writeFileRaw converts on big-endian hosts).

Tensors in the pickle: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`
where `storage` comes from a persistent id ('storage', <storage class>, key, location, numel). Offsets and
strides count *elements*, not bytes. Several tensors may view one storage (shared, transposed, sliced,
overlapping). We read storages lazily: the pickle yields placeholders (_TensorRef) whose bounds are checked at
once, and arrays are made after the pickle is done (the legacy format stores the bytes *after* the pickle).

The allow-list (everything else raises UnsafeCheckpointError naming the global):
  tensors      torch._utils._rebuild_tensor / _v2 / _v3, _rebuild_parameter(_with_state),
               torch._tensor._rebuild_from_type_v2, torch.*Storage / torch.UntypedStorage, torch dtypes
  containers   collections.OrderedDict (+ BUILD of its `_metadata`), set, frozenset, torch.Size, torch.device
  NumPy        numpy.dtype, numpy.(_)core.multiarray.scalar and ._reconstruct (number dtypes only), _codecs.encode
  inert        INERT_CLASSES (Lightning's ModelCheckpoint): recorded as InertObject, never imported
Every callable is our own implementation, which validates its arguments; the real torch/NumPy function is
never looked up.

Result: nested dicts/lists/tuples as pickled, with np.ndarray leaves. float16 stays float16, bfloat16 and float8
become float32 (NumPy has no such types), bool/ints keep their type. A contiguous tensor is a view of its storage
(read-only and zero-copy with mmap=True; tensors sharing a storage share memory, as in torch); a non-contiguous
one is copied into a fresh C-contiguous array.

References (pinned):
  torch.save / torch.load   https://github.com/pytorch/pytorch/blob/v2.5.0/torch/serialization.py
  tensor rebuild functions  https://github.com/pytorch/pytorch/blob/v2.5.0/torch/_utils.py
  pickle opcodes            https://github.com/python/cpython/blob/v3.11.7/Lib/pickletools.py
  ZIP local file header     https://pkware.cachefly.net/webdocs/casestudies/APPNOTE.TXT (section 4.3.7)
"""
import collections
import io
import mmap as _mmap
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np

from minisd.errors import UserError
from minisd.io.safetensors import bf16_to_float32, float8_e4m3fn_to_float32, float8_e5m2_to_float32


class TorchFileError(UserError, ValueError):
    """The file is not a readable torch checkpoint (truncated, corrupt, missing records, unsupported feature)."""


class UnsafeCheckpointError(TorchFileError):
    """The pickle asks for something outside the allow-list: it could run code, so nothing is loaded."""


# ----------------------------------------------------------------------------------------------------------------
# dtypes: torch dtype name -> (NumPy dtype of the stored elements, decoder to a NumPy type or None)

_DTYPES = {
    "float32": ("f4", None), "float64": ("f8", None), "float16": ("f2", None),
    "bfloat16": ("u2", bf16_to_float32), "float8_e4m3fn": ("u1", float8_e4m3fn_to_float32),
    "float8_e5m2": ("u1", float8_e5m2_to_float32),
    "int64": ("i8", None), "int32": ("i4", None), "int16": ("i2", None), "int8": ("i1", None),
    "uint64": ("u8", None), "uint32": ("u4", None), "uint16": ("u2", None), "uint8": ("u1", None),
    "bool": ("u1", lambda u8: u8 != 0),  # any non-zero byte is True (a raw view could hold 2..255 otherwise)
    "complex64": ("c8", None), "complex128": ("c16", None),
}
# Legacy typed storage classes (still what torch 2.x writes for these dtypes) -> dtype name
_STORAGE_CLASSES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# torch dtype objects that may appear as globals (`torch.float16`); tensors need a dtype from _DTYPES
_TORCH_DTYPE_NAMES = set(_DTYPES) | {"complex32", "qint8", "quint8", "qint32", "quint4x2", "float8_e4m3fnuz",
                                     "float8_e5m2fnuz", "float8_e8m0fnu"}


class TorchDtype:
    """Stands for a `torch.<name>` dtype object found in a checkpoint (e.g. a saved config value)."""

    def __init__(self, name):
        self.name = name

    def __eq__(self, other):
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self):
        return hash(("torch dtype", self.name))

    def __repr__(self):
        return f"torch.{self.name}"


class InertObject:
    """An instance of a known metadata class (e.g. Lightning's ModelCheckpoint callback), kept as plain data.
    The class is never imported; `class_name`, `args` and `state` record what the pickle held."""

    def __init__(self, class_name, args=(), state=None):
        self.class_name, self.args, self.state = class_name, tuple(args), state

    def __repr__(self):
        return f"<inert {self.class_name}>"


class InertClass:
    """Stands for a known metadata class: calling it makes an InertObject. Hashable (Lightning stores callback
    states in a dict keyed by the callback *class*)."""

    def __init__(self, class_name):
        self.class_name = class_name

    def __call__(self, *args):
        return InertObject(self.class_name, args)

    def __eq__(self, other):
        return isinstance(other, InertClass) and other.class_name == self.class_name

    def __hash__(self):
        return hash(("inert class", self.class_name))

    def __repr__(self):
        return f"<inert class {self.class_name}>"


# Known inert metadata classes: Lightning checkpoints store the ModelCheckpoint callback (paths, best scores) as a
# pickled object. It is metadata we never need; we record it instead of importing Lightning.
INERT_CLASSES = {
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
}


class _StorageType:
    """Stands for a storage class global (torch.FloatStorage, torch.UntypedStorage, ...)."""

    def __init__(self, dtype):
        self.dtype = dtype  # torch dtype name; UntypedStorage is bytes ("uint8")


class _TorchClass:
    """Stands for a class named only as an argument: torch.Tensor / torch.nn.Parameter in _rebuild_from_type_v2,
    numpy.ndarray in numpy's _reconstruct. Never instantiated or called."""

    def __init__(self, name):
        self.name = name


class _Callable:
    """An allow-listed function: the only things REDUCE may call."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn


class _StorageRef:
    """A storage named by a persistent id: its key in the file, element dtype and element count."""

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor view of a storage, bounds-checked; turned into an ndarray once storages are readable."""

    def __init__(self, storage, dtype, offset, size, stride):
        self.storage, self.dtype, self.offset, self.size, self.stride = storage, dtype, offset, size, stride


class _NumpyDtypeSpec:
    """numpy.dtype(descr) as pickled by NumPy: REDUCE makes it, then BUILD sets the byte order."""

    def __init__(self, descr):
        self.descr, self.byteorder = descr, "="


class _NumpyArrayRef:
    """numpy.ndarray as pickled by NumPy: `_reconstruct(ndarray, (0,), b'b')` makes an empty shell, BUILD then
    gives (version, shape, dtype, is_fortran, raw bytes). We keep the pieces and make the array at the end."""

    def __init__(self):
        self.state = None

    def array(self):
        if self.state is None:
            raise TorchFileError("a pickled numpy array was never filled in (BUILD missing)")
        shape, spec, fortran, raw = self.state
        dt = np.dtype(spec.descr)
        if spec.byteorder in "<>":
            dt = dt.newbyteorder(spec.byteorder)
        a = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")
        return a.astype(dt.newbyteorder("="), order="C")  # a private, native-order, C-contiguous copy


# ----------------------------------------------------------------------------------------------------------------
# our safe implementations of the allow-listed callables

def _ints(v, what):
    """A tuple of non-negative Python ints (size or stride), else TorchFileError."""
    if not isinstance(v, (tuple, list)) or not all(type(x) is int and x >= 0 for x in v):
        raise TorchFileError(f"tensor {what} must be a tuple of non-negative integers, got {v!r}"[:300])
    return tuple(v)


def _tensor_ref(storage, offset, size, stride, dtype=None):
    """Validate a tensor view of `storage` and return a _TensorRef. dtype: a TorchDtype (v3) or None (v2: the
    storage's own dtype). Malicious offsets/strides must not let a view reach outside the storage."""
    if not isinstance(storage, _StorageRef):
        raise TorchFileError(f"a tensor's storage must come from a persistent id, got {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise TorchFileError(f"tensor storage offset must be a non-negative integer, got {offset!r}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} have different lengths")
    name = storage.dtype if dtype is None else dtype.name
    if name not in _DTYPES:
        raise TorchFileError(f"tensors of dtype torch.{name} are not supported (supported: {', '.join(_DTYPES)})")
    itemsize = np.dtype(_DTYPES[name][0]).itemsize
    storage_bytes = storage.numel * np.dtype(_DTYPES[storage.dtype][0]).itemsize
    numel = 1
    for s in size:
        numel *= s
    if numel:  # an empty tensor touches no element, whatever its offset
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))  # index of the furthest element
        if (last + 1) * itemsize > storage_bytes:
            raise TorchFileError(f"tensor (offset {offset}, size {size}, stride {stride}, {name}) reaches element "
                                 f"{last} but its storage '{storage.key}' holds only {storage_bytes // itemsize}")
        # A view may repeat elements (stride 0), and we copy non-contiguous views: refuse a small storage
        # blown up into gigabytes (torch would make a zero-copy view; a hostile file would make us allocate).
        if numel * itemsize > max(storage_bytes, 1 << 30):
            raise TorchFileError(f"tensor of size {size} repeats its {storage_bytes}-byte storage into "
                                 f"{numel * itemsize} bytes; refusing to allocate that")
    return _TensorRef(storage, name, offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride)  # requires_grad/hooks/metadata do not matter here


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    # torch >= 2.1 writes this for dtypes without a legacy storage class (uint16, float8...): an untyped
    # (byte) storage plus an explicit dtype
    if not isinstance(dtype, TorchDtype):
        raise TorchFileError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}"[:200])
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _TensorRef):
        raise TorchFileError(f"a Parameter must wrap a tensor, got {type(data).__name__}")
    return data  # a Parameter is just its tensor for us


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)  # state = Python attributes; dropped


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                      _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch writes this for a tensor that carries Python attributes: rebuild with `func`, then set the class
    # and attributes. Only the plain Tensor/Parameter classes and our own rebuild functions are accepted.
    if not (isinstance(func, _Callable) and func.fn in _TENSOR_REBUILDERS and isinstance(new_type, _TorchClass)
            and isinstance(args, tuple)):
        raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with function {func!r} and type {new_type!r} is not "
                                    f"on the allow-list"[:300])
    return func.fn(*args)


def _ordered_dict(*args):
    if args not in ((),) and not (len(args) == 1 and isinstance(args[0], list)):
        raise TorchFileError(f"OrderedDict rebuilt with unexpected arguments {args!r}"[:200])
    return collections.OrderedDict(*args)


def _numpy_dtype(descr, align=False, copy=True):
    """numpy.dtype(descr) for plain number types only (no object, string or structured dtypes)."""
    if not isinstance(descr, str) or np.dtype(descr).kind not in "biufc" or np.dtype(descr).fields:
        raise UnsafeCheckpointError(f"numpy dtype {descr!r} is not a plain number type"[:200])
    return _NumpyDtypeSpec(descr)


def _numpy_scalar(spec, data):
    """numpy.core.multiarray.scalar(dtype, bytes): how NumPy pickles e.g. np.int64(470000) (Lightning's
    global_step). We decode the bytes ourselves."""
    if not isinstance(spec, _NumpyDtypeSpec) or not isinstance(data, bytes):
        raise TorchFileError(f"numpy scalar needs (dtype, bytes), got ({type(spec).__name__}, "
                             f"{type(data).__name__})")
    dt = np.dtype(spec.descr)
    if spec.byteorder in "<>":
        dt = dt.newbyteorder(spec.byteorder)
    if len(data) != dt.itemsize:
        raise TorchFileError(f"numpy scalar of dtype {dt} needs {dt.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dt)[0]


def _numpy_reconstruct(cls, shape, typecode):
    """numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b'): the empty shell BUILD fills."""
    if not (isinstance(cls, _TorchClass) and cls.name == "numpy.ndarray"):
        raise UnsafeCheckpointError(f"numpy _reconstruct of {cls!r} (only numpy.ndarray is allowed)"[:200])
    return _NumpyArrayRef()


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store Python 3 bytes as _codecs.encode(latin-1 str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode is only allowed as (str, 'latin1'), got encoding "
                                    f"{encoding!r}"[:200])
    return text.encode("latin1")


def _device(name, index=None):
    if not isinstance(name, str):
        raise TorchFileError(f"torch.device needs a string, got {name!r}"[:200])
    return name if index is None else f"{name}:{index}"  # where the tensor lived; we load everything to host


def _size(dims=()):
    return _ints(dims, "torch.Size")


def _empty_bytes(*args):
    # protocol 2 writes b"" as bytes() (non-empty bytes go through _codecs.encode)
    if args:
        raise UnsafeCheckpointError("bytes() is only allowed without arguments")
    return b""


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise TorchFileError("set() must be rebuilt from a list")
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


_CALLABLES = {  # "module.name" -> our implementation (never the real one)
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,  # NumPy 1.x name
    "numpy._core.multiarray.scalar": _numpy_scalar,  # NumPy 2.x name
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "_codecs.encode": _codecs_encode,
    "torch.device": _device,
    "torch.Size": _size,
    "builtins.set": _set, "__builtin__.set": _set,  # __builtin__: Python-2 name used by protocol-2 pickles
    "builtins.frozenset": _frozenset, "__builtin__.frozenset": _frozenset,
    "builtins.bytes": _empty_bytes, "__builtin__.bytes": _empty_bytes,
}


def _lookup_global(module, name):
    """The allow-list: what a GLOBAL opcode may resolve to. Raises UnsafeCheckpointError for anything else."""
    full = f"{module}.{name}"
    if full in _CALLABLES:
        return _Callable(full, _CALLABLES[full])
    if module in ("torch", "torch.cuda") and name in _STORAGE_CLASSES:
        return _StorageType(_STORAGE_CLASSES[name])
    if full in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
        return _StorageType("uint8")
    if module == "torch" and name in _TORCH_DTYPE_NAMES:
        return TorchDtype(name)
    if full in ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter",
                "numpy.ndarray"):
        return _TorchClass(full)
    if full in INERT_CLASSES:
        return InertClass(full)
    raise UnsafeCheckpointError(
        f"refusing to load: the pickle references {full}, which is not on minisd's allow-list (plain tensors and a "
        f"few metadata types); an arbitrary global could run code, and minisd only reads tensors. If you trust "
        f"the file, convert it with PyTorch "
        f"(torch.load, then safetensors.torch.save_file) and load the .safetensors file.")


# ----------------------------------------------------------------------------------------------------------------
# the restricted unpickler

class _Dispatch(dict):
    def __missing__(self, opcode):
        raise TorchFileError(f"unsupported pickle opcode {bytes([opcode])!r} (corrupt file, or a newer format)")


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that imports or calls something replaced.

    Why `pickle._Unpickler` (the pure-Python implementation of `pickle.Unpickler`) and not the C one: in C only
    find_class and persistent_load can be overridden, but BUILD would still call any object's __setstate__ or
    setattr() on it. Here each such opcode goes through a method below. Speed is no concern: the pickle of an
    SD checkpoint is ~100 KB; the tensor bytes never pass through it.
    """

    dispatch = _Dispatch(pickle._Unpickler.dispatch)

    def __init__(self, data, legacy):
        super().__init__(io.BytesIO(data) if isinstance(data, bytes) else data, encoding="utf-8")
        self.legacy = legacy
        self.storages = {}  # key -> first _StorageRef seen (legacy files need one element size per key)

    def find_class(self, module, name):  # GLOBAL / STACK_GLOBAL / INST: never imports anything
        if not module or not name:
            raise TorchFileError("corrupt pickle: a GLOBAL opcode with an empty name (truncated data.pkl?)")
        return _lookup_global(module, name)

    def persistent_load(self, pid):
        # torch: ('storage', storage_type, key, location, numel) (+ view_metadata in legacy files)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise TorchFileError(f"unexpected persistent id {pid!r}; expected ('storage', type, key, location, "
                                 f"numel)"[:300])
        stype, key, _location, numel = pid[1:5]
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise TorchFileError(f"malformed storage record {pid!r}"[:300])
        if len(pid) == 6 and pid[5] is not None:
            raise TorchFileError("storage views (files from torch < 0.4) are not supported; re-save the file "
                                 "with a newer torch")
        ref = _StorageRef(key, stype.dtype, numel)
        first = self.storages.setdefault(key, ref)
        if self.legacy and (first.dtype, first.numel) != (ref.dtype, ref.numel):
            raise TorchFileError(f"storage '{key}' is described twice with different types or sizes")
        return ref

    # ---- opcodes that call or mutate something: each accepts only our own objects
    def load_reduce(self):  # R: callable(*args)
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, InertClass):
            func = _Callable(func.class_name, func)
        if not isinstance(func, _Callable):
            raise UnsafeCheckpointError(f"refusing to load: the pickle calls a {type(func).__name__} object "
                                        f"({func!r})"[:300] + ", which is not an allow-listed function")
        if not isinstance(args, tuple):
            raise TorchFileError(f"REDUCE arguments must be a tuple, got {type(args).__name__}")
        self.stack[-1] = func.fn(*args)

    def load_build(self):  # b: obj.__setstate__(state); allowed on the few object kinds that use it
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, InertObject):
            inst.state = state
        elif isinstance(inst, _NumpyArrayRef):
            self._build_numpy_array(inst, state)
        elif isinstance(inst, _NumpyDtypeSpec):
            # NumPy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
                raise TorchFileError(f"unexpected numpy dtype state {state!r}"[:200])
            inst.byteorder = state[1]
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and all(
                isinstance(k, str) for k in state):
            inst.__dict__.update(state)  # a state_dict's `_metadata` (module versions): plain attributes
        else:
            raise UnsafeCheckpointError(f"refusing to load: the pickle sets the state of a {type(inst).__name__} "
                                        f"object, which is not allowed")

    @staticmethod
    def _build_numpy_array(inst, state):
        # ndarray.__setstate__((version, shape, dtype, is_fortran, data)); only raw-byte data (no object arrays)
        ok = isinstance(state, tuple) and len(state) == 5
        if ok:
            _version, shape, spec, fortran, raw = state
            ok = isinstance(spec, _NumpyDtypeSpec) and isinstance(fortran, bool) and isinstance(raw, bytes)
        if not ok:
            raise UnsafeCheckpointError("refusing to load: a pickled numpy array with unexpected state (only plain "
                                        "number arrays are allowed)")
        shape = _ints(shape, "numpy array shape")
        need = np.dtype(spec.descr).itemsize * int(np.prod(shape, dtype=object))
        if len(raw) != need:
            raise TorchFileError(f"pickled numpy array of shape {shape} needs {need} bytes, has {len(raw)}")
        inst.state = (shape, spec, fortran, raw)

    def load_newobj(self):  # \x81: cls.__new__(cls, *args)
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._instantiate_checked(cls, args))

    def load_newobj_ex(self):  # \x92: cls.__new__(cls, *args, **kwargs)
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise UnsafeCheckpointError("refusing to load: NEWOBJ_EX with keyword arguments")
        self.append(self._instantiate_checked(cls, args))

    def _instantiate(self, klass, args):  # used by INST and OBJ (protocol 0/1)
        self.append(self._instantiate_checked(klass, args))

    def _instantiate_checked(self, cls, args):
        if not isinstance(cls, InertClass):
            raise UnsafeCheckpointError(f"refusing to load: the pickle creates an object of {cls!r}, which is not "
                                        f"an allow-listed class"[:300])
        return cls(*args)

    def load_ext(self):  # EXT1/2/4 look names up in the process-wide copyreg registry: never needed by torch
        raise TorchFileError("unsupported pickle opcode EXT (copyreg extension registry)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = load_ext
    del _op


def _unpickle(data, legacy):
    """Run the restricted unpickler on one pickle (bytes, or a file positioned at it; reading stops right after
    its STOP opcode). Returns (object, {storage key: _StorageRef})."""
    u = _RestrictedUnpickler(data, legacy)
    try:
        return u.load(), u.storages
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
        raise TorchFileError(f"corrupt pickle ({type(e).__name__}: {e})"[:400]) from e


# ----------------------------------------------------------------------------------------------------------------
# storage bytes

class _Bytes:
    """Byte ranges of the open file: views of a read-only memory map, or fresh private reads (mmap=False)."""

    def __init__(self, f, size, use_mmap):
        self.f, self.size = f, size
        self.mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) if use_mmap else None

    def read(self, offset, nbytes, what):
        if offset < 0 or offset + nbytes > self.size:
            raise TorchFileError(f"{what} needs bytes {offset}..{offset + nbytes} but the file is only {self.size} "
                                 f"bytes long: the file is truncated (download it again)")
        if self.mm is not None:
            return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=offset)
        out = np.empty(nbytes, dtype=np.uint8)
        self.f.seek(offset)
        if self.f.readinto(out) != nbytes:
            raise TorchFileError(f"{what}: short read (was the file truncated while reading?)")
        return out


def _check_storage_bytes(raw, ref):
    """The raw bytes (uint8 array) of storage `ref`, checked to hold the numel elements the pickle announced."""
    nbytes = ref.numel * np.dtype(_DTYPES[ref.dtype][0]).itemsize
    if raw.size < nbytes:
        raise TorchFileError(f"storage '{ref.key}' has {raw.size} bytes but the pickle says it holds {ref.numel} "
                             f"{ref.dtype} elements ({nbytes} bytes): the file is truncated or corrupt")
    return raw[:nbytes]


def _tensor_array(t, raw, byteorder):
    """Make the ndarray for _TensorRef `t` from its storage's checked raw bytes (uint8, 1-D)."""
    code, decode = _DTYPES[t.dtype]
    dt = np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")
    storage = raw[:raw.size // dt.itemsize * dt.itemsize].view(dt)  # (numel,) elements; v3 views bytes as dtype
    numel = int(np.prod(t.size, dtype=object))
    contiguous = all(st == int(np.prod(t.size[i + 1:], dtype=object))
                     for i, (s, st) in enumerate(zip(t.size, t.stride)) if s > 1)
    if numel == 0:
        a = np.empty(t.size, dtype=dt)
    elif contiguous:
        a = storage[t.offset:t.offset + numel].reshape(t.size)  # a view: zero-copy, shares the storage
    else:
        # Bounds were checked in _tensor_ref. The strided view is read-only (overlapping elements must not be
        # written through it) and is copied below into a normal C-contiguous array.
        a = np.lib.stride_tricks.as_strided(storage[t.offset:], shape=t.size,
                                            strides=[st * dt.itemsize for st in t.stride], writeable=False)
    if decode is not None:
        a = decode(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # big-endian file: convert to this machine's order
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


def _resolve(obj, make, memo):
    """Replace every _TensorRef / _StorageRef in the unpickled structure by its array (containers updated in
    place so that shared and cyclic references stay as pickled)."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, (_TensorRef, _StorageRef)):
        memo[key] = make(obj)
    elif isinstance(obj, _NumpyArrayRef):
        memo[key] = obj.array()
    elif isinstance(obj, dict):  # dict, OrderedDict
        memo[key] = obj
        for k, v in list(obj.items()):
            obj[k] = _resolve(v, make, memo)
    elif isinstance(obj, list):
        memo[key] = obj
        for i, v in enumerate(obj):
            obj[i] = _resolve(v, make, memo)
    elif isinstance(obj, tuple):
        memo[key] = tuple(_resolve(v, make, memo) for v in obj)
    elif isinstance(obj, InertObject):
        memo[key] = obj
        obj.args = _resolve(obj.args, make, memo)
        obj.state = _resolve(obj.state, make, memo)
    else:
        memo[key] = obj
    return memo[key]


# ----------------------------------------------------------------------------------------------------------------
# the two formats

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version..sizes skipped), name length, extra length


def _load_zip(f, data):
    try:
        z = zipfile.ZipFile(f)
        infos = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise TorchFileError(f"damaged zip archive ({e}): the file is truncated or corrupt (download it again)") from e
    names = {i.filename: i for i in infos}
    pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not pkls:
        raise TorchFileError("zip archive has no <folder>/data.pkl: not a torch.save file")
    if len(pkls) > 1:
        # torch takes the folder of the first entry in the archive
        first = infos[0].filename.split("/")[0] + "/"
        pkls = [n for n in pkls if n.startswith(first)]
        if len(pkls) != 1:
            raise TorchFileError("zip archive holds several data.pkl records; cannot tell which one to read")
    prefix = pkls[0][:-len("data.pkl")]

    def read_member(name):  # small members only (data.pkl, byteorder) or compressed storages
        try:
            return z.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise TorchFileError(f"cannot read zip member '{name}' ({e}): the file is corrupt") from e

    byteorder = "little"  # older torch versions wrote no byteorder record: little-endian
    if prefix + "byteorder" in names:
        byteorder = read_member(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise TorchFileError(f"byteorder record says {byteorder!r}; expected 'little' or 'big'")
    obj, refs = _unpickle(read_member(pkls[0]), legacy=False)

    def storage_bytes(key):
        name = f"{prefix}data/{key}"
        info = names.get(name)
        if info is None:
            raise TorchFileError(f"storage record '{name}' is missing from the archive (truncated or corrupt file)")
        if info.flag_bits & 0x1:
            raise TorchFileError(f"storage record '{name}' is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            # not written by torch, but legal zip: inflate into memory (checks the CRC too)
            return np.frombuffer(read_member(name), dtype=np.uint8)
        # Stored member: its bytes follow the 30-byte local header, the name and the "extra" field (which torch
        # uses as padding to align the data to 64 bytes). We find the offset and map the bytes directly.
        header = data.read(info.header_offset, _LOCAL_HEADER.size, f"local header of '{name}'")
        sig, name_len, extra_len = _LOCAL_HEADER.unpack(header.tobytes())
        if sig != b"PK\x03\x04":
            raise TorchFileError(f"bad local zip header for '{name}': the file is corrupt")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        return data.read(start, info.file_size, f"storage record '{name}'")

    return obj, refs, storage_bytes, byteorder


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(f, data):
    magic, _ = _unpickle(f, legacy=True)
    if magic != _LEGACY_MAGIC:
        raise TorchFileError("not a torch file: a pickle without torch's magic number (a plain pickle is not "
                             "loaded by minisd)")
    protocol, _ = _unpickle(f, legacy=True)
    if protocol != _LEGACY_PROTOCOL:
        raise TorchFileError(f"unsupported legacy torch protocol {protocol!r} (expected {_LEGACY_PROTOCOL})")
    _sys_info, _ = _unpickle(f, legacy=True)  # {'little_endian': ..., 'type_sizes': ...}: storages are LE anyway
    obj, refs = _unpickle(f, legacy=True)
    keys, _ = _unpickle(f, legacy=True)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchFileError("legacy torch file: the storage key list is malformed")
    # The storages follow, in the order of `keys`: [u64 LE element count][count * itemsize bytes] each.
    pos = f.tell()
    found = {}
    for key in keys:
        ref = refs.get(key)
        if ref is None:
            raise TorchFileError(f"legacy torch file lists storage '{key}' that no tensor uses")
        count = int(data.read(pos, 8, f"size of storage '{key}'").view("<u8")[0])
        if count != ref.numel:
            raise TorchFileError(f"storage '{key}' has {count} elements on disk but the pickle says {ref.numel}")
        nbytes = count * np.dtype(_DTYPES[ref.dtype][0]).itemsize
        found[key] = data.read(pos + 8, nbytes, f"storage '{key}'")
        pos += 8 + nbytes

    def storage_bytes(key):
        if key not in found:
            raise TorchFileError(f"storage '{key}' is used by a tensor but missing from the file's storage list")
        return found[key]

    return obj, refs, storage_bytes, "little"


def load_torch_file(path, mmap=True):
    """Load a torch.save file -> the pickled object with np.ndarray in place of tensors. Never runs pickled code.

    Typical results: a state_dict {name: array}; a Lightning checkpoint {"state_dict": {...}, "global_step":
    np.int64(...), ...}; the caller picks the part it needs. mmap=True: contiguous tensors are read-only views of
    the memory-mapped file (zero copy; copy with np.array to write); mmap=False reads into private memory.
    Raises UnsafeCheckpointError if the pickle names anything outside the allow-list, TorchFileError for damaged
    or unsupported files; both messages start with the path.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            f.seek(0)
            if size == 0:
                raise TorchFileError("the file is empty")
            data = _Bytes(f, size, mmap)
            if head.startswith(b"PK"):  # zip local header / empty archive / spanned archive signatures
                obj, refs, storage_bytes, byteorder = _load_zip(f, data)
            elif head[:1] == b"\x80":  # pickle PROTO opcode: the legacy format starts with a protocol-2 pickle
                obj, refs, storage_bytes, byteorder = _load_legacy(f, data)
            elif _is_tar(f):
                raise TorchFileError("this is the tar format of torch < 0.4, which minisd does not read; re-save "
                                     "it with a newer torch")
            else:
                raise TorchFileError("not a torch checkpoint (neither a zip archive nor a legacy torch pickle); "
                                     "for .safetensors files use minisd.io.safetensors.load")
            raw = {}  # storage key -> its bytes in the file, located once

            def make(ref):
                s = ref if isinstance(ref, _StorageRef) else ref.storage
                if s.key not in raw:
                    raw[s.key] = storage_bytes(s.key)
                # checked against *this* reference's numel: the bounds of `ref` were checked against it
                checked = _check_storage_bytes(raw[s.key], s)
                if isinstance(ref, _StorageRef):  # a storage saved on its own: all its elements
                    ref = _TensorRef(s, s.dtype, 0, (s.numel,), (1,))
                return _tensor_array(ref, checked, byteorder)

            try:
                return _resolve(obj, make, {})
            except RecursionError as e:
                raise TorchFileError("the pickled structure is nested too deeply") from e
    except TorchFileError as e:
        raise type(e)(f"{path}: {e}") from e.__cause__


def _is_tar(f):
    try:
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False
    finally:
        f.seek(0)

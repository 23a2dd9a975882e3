"""A stand-in for CuPy on machines without a GPU: checks that minisd's *GPU code path* (the Python around the
kernels: launchers, models, the backend switch) runs on device arrays, not only the kernels.

    fake = install(monkeypatch)          # sys.modules["cupy"] = this stand-in, for one test
    y = model.forward(fake.asarray(x))   # hot ops take the "cupy" target; kernels run in the CPU emulator

What it models (CuPy 14 behaviour that NumPy-only code trips over, from cupy/_core: __array_ufunc__ refuses NumPy
operands; _prepare_slice_list converts NumPy index arrays; _scatter_op copies NumPy values to the device):
  * `ndarray` is not a numpy.ndarray and lives in module "cupy", so minisd.backend.is_cuda / xp_of see a GPU array;
  * implicit conversion to NumPy is refused (np.asarray, np.ascontiguousarray, np.array: TypeError), as is any
    operation mixing it with a NumPy array (operators, ufuncs, np.* functions through __array_function__): the
    mistakes that only show on a GPU (`np.zeros` where `xp.zeros` was meant, a host array meeting a device one);
  * allowed, as in CuPy: NumPy ufuncs and functions on device arrays (dispatched), NumPy index arrays, NumPy values
    assigned into a device array (a host-to-device copy), float()/bool() of 0-d arrays (a synchronisation), .get();
  * `RawModule(code=...)` builds the kernels with the emulator (kernels/emu) and launches them on the stand-in
    arrays; a NumPy array passed to a kernel is refused (CuPy: "Unsupported type"); `cuda.Device().attributes`,
    `cuda.runtime.getDeviceCount()` answer like a one-GPU H100 machine.
Not modelled: streams, asynchrony, memory pools, device-only functions missing from CuPy (an np.* function CuPy
lacks would fail there but runs here), dtype promotion differences. Arrays are NumPy arrays underneath.
"""
import sys
import types

import numpy as np

_REFUSED = ("Implicit conversion to a NumPy array is not allowed (fake CuPy: this code would fail on a GPU). "
            "Use xp = minisd.backend.xp_of(x) instead of np, or .get() for an explicit copy to the host.")


def _unwrap(obj, op):
    """Replace stand-in arrays by their NumPy payload (recursively in lists/tuples/dicts); refuse NumPy arrays."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{op}: a NumPy array ({obj.shape}, {obj.dtype}) meets a CuPy array; {_REFUSED}")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, op) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, op) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, np.ndarray):
        return ndarray(obj)
    if isinstance(obj, np.generic):  # NumPy reductions give scalars; CuPy gives 0-d device arrays
        return ndarray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wrap(o) for o in obj)
    return obj


def _index(key):
    """Indices: stand-in arrays unwrapped; NumPy index arrays accepted (CuPy copies them to the device)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


class ndarray:
    """A device array: a NumPy array that refuses to be mixed with host arrays."""
    __module__ = "cupy"  # minisd.backend.is_cuda() looks at the module name
    __array_priority__ = 1000

    def __init__(self, a):
        self._a = a

    # -- conversions CuPy refuses or allows
    def __array__(self, *args, **kwargs):
        raise TypeError(_REFUSED)

    def get(self):
        return self._a.copy()

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(a) for a in self._a)

    def __repr__(self):
        return f"fake_cupy.ndarray({self._a!r})"

    # -- attributes and methods: NumPy's, with stand-in arrays in and out
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __getattr__(self, name):
        if name.startswith("__"):  # e.g. __array_interface__: NumPy would read the payload through it
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            return _wrap(attr(*_unwrap(args, name), **_unwrap(kwargs, name)))
        return method

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        # CuPy copies a NumPy value to the device (allowed); a stand-in value is unwrapped
        self._a[_index(key)] = value._a if isinstance(value, ndarray) else value

    # -- NumPy protocols: ufuncs and functions dispatch here (as for CuPy), mixing with NumPy arrays is refused
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = f"np.{ufunc.__name__}"
        result = getattr(ufunc, method)(*_unwrap(inputs, name), **_unwrap(kwargs, name))
        if "out" in kwargs:
            out = kwargs["out"]
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        name = f"np.{func.__name__}"
        return _wrap(func(*_unwrap(args, name), **_unwrap(kwargs, name)))


def _binop(name):
    def op(self, other):
        return _wrap(getattr(self._a, name)(_unwrap(other, name)))
    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other, name))
        return self
    return op


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lt", "le",
           "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_n}__", _binop(f"__{_n}__"))
    if _n not in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(ndarray, f"__r{_n}__", _binop(f"__r{_n}__"))
        setattr(ndarray, f"__i{_n}__", _inplace(f"__i{_n}__"))
for _n in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_n}__", lambda self, _n=_n: _wrap(getattr(self._a, f"__{_n}__")()))


# ----------------------------------------------------------------------------------------------------------------
# the module

def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray(np.array(a, dtype=dtype, order=order or "K", copy=True))  # host -> device copy


def array(a, dtype=None, copy=True, order="K"):
    a = a._a if isinstance(a, ndarray) else a
    return ndarray(np.array(a, dtype=dtype, copy=copy, order=order))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def ascontiguousarray(a, dtype=None):
    return ndarray(np.ascontiguousarray(_unwrap(a, "cupy.ascontiguousarray"), dtype=dtype))


def get_array_module(*args):
    return sys.modules[__name__]


class _Kernel:
    """cupy.RawKernel stand-in: the emulator's kernel, called with stand-in arrays."""

    def __init__(self, emu_kernel):
        self._k = emu_kernel

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._k.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, n):
        self._k.max_dynamic_shared_size_bytes = n

    def __call__(self, grid, block, args, shared_mem=0):
        self._k(grid, block, tuple(_unwrap(a, f"kernel {self._k.name} argument {i}") for i, a in enumerate(args)),
                shared_mem=shared_mem)


class RawModule:
    """cupy.RawModule(code=..., options=...) stand-in: builds the source with the CPU emulator."""

    def __init__(self, code=None, options=(), **kwargs):
        from minisd.cuda.emu import EmuRawModule
        from minisd.cuda.launch import resources_sm90
        from minisd.cuda import sources as kernels
        name = next((p.name for p in kernels.sources() if p.read_text() == code), "kernel.cu")
        self._m = EmuRawModule(code, options=options, name=f"kernels/{name}",
                               resources=resources_sm90().get(name, {}))

    def get_function(self, name):
        return _Kernel(self._m.get_function(name))


class _Device:
    id = 0
    attributes = {"MultiProcessorCount": 132}

    def __init__(self, device=0):
        pass


cuda = types.SimpleNamespace(Device=_Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
__version__ = "fake"


class _Ufunc:
    """cupy.add & co.: callable, and .at(a, indices, b) with NumPy index arrays allowed (CuPy copies them)."""

    def __init__(self, uf):
        self._uf = uf

    def __call__(self, *args, **kwargs):
        name = f"cupy.{self._uf.__name__}"
        return _wrap(self._uf(*_unwrap(args, name), **_unwrap(kwargs, name)))

    def at(self, a, indices, b=None):
        name = f"cupy.{self._uf.__name__}.at"
        self._uf.at(_unwrap(a, name), _index(indices), *(() if b is None else (_unwrap(b, name),)))

    def reduce(self, *args, **kwargs):
        name = f"cupy.{self._uf.__name__}.reduce"
        return _wrap(self._uf.reduce(*_unwrap(args, name), **_unwrap(kwargs, name)))


def __getattr__(name):
    """Everything else: NumPy's function of that name on the NumPy payloads, results wrapped; dtypes as they are."""
    attr = getattr(np, name)
    if isinstance(attr, np.ufunc):
        return _Ufunc(attr)
    if isinstance(attr, type) or not callable(attr):
        return attr

    def fn(*args, **kwargs):
        return _wrap(attr(*_unwrap(args, f"cupy.{name}"), **_unwrap(kwargs, f"cupy.{name}")))
    return fn


def install(monkeypatch):
    """Make `import cupy` return this module for the rest of the test (and start with an empty kernel cache)."""
    from minisd.cuda import launch
    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(launch, "_modules", {})
    return module

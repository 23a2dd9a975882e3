"""Array backend: NumPy (the spec) or CuPy (the GPU path). One question answered in one place.

Models and pipelines are written against an "array module" `xp` so the same code runs on numpy or cupy
arrays. Hot ops (conv, attention, GroupNorm, ...) ask `use_cuda_ops(x)` once at their top and hand the work to
the CUDA kernels in minisd/cuda/; everything else just uses `xp_of(x)`.

Emulation: with `with minisd.backend.emulate():` (also `minisd.cuda.emulate()`) or the environment variable
MINISD_CUDA_EMULATE=1, the hot ops run their CUDA kernels on float32 NumPy arrays through the CPU emulator
(kernels/emu/), with `xp = numpy`. That is how the GPU path is tested on machines without a GPU.
MINISD_CUDA_EMULATE=sanitize (or `emulate(sanitize=True)`) builds the kernels with ASan+UBSan; the process must
then run under `python -m minisd.cuda.emu.asan ...`. The switch is process-wide (not per thread).
"""
import os
from contextlib import contextmanager

import numpy as np

_emulation = None  # set by emulate(): None (use the environment), "emulate", "sanitize" or "off"


def is_cuda(x):
    """True if x is a CuPy array. Checked by module name so that importing minisd never imports CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def xp_of(*arrays):
    """The array module (numpy or cupy) of the first non-None array."""
    for a in arrays:
        if a is not None and is_cuda(a):
            import cupy  # noqa: only reached when the caller already holds a CuPy array
            return cupy
    return np


def to_numpy(x):
    """Host copy of a numpy or cupy array (no copy for numpy)."""
    return x.get() if is_cuda(x) else np.asarray(x)


def emulation_mode():
    """None (off), "emulate" or "sanitize": from emulate() if active, else from $MINISD_CUDA_EMULATE."""
    if _emulation is not None:
        return None if _emulation == "off" else _emulation
    env = os.environ.get("MINISD_CUDA_EMULATE", "").strip().lower()
    if env in ("", "0", "off", "no", "false"):
        return None
    return "sanitize" if env == "sanitize" else "emulate"


@contextmanager
def emulate(sanitize=False, enabled=True):
    """Inside this block, hot ops on float32 NumPy arrays run their CUDA kernels in the CPU emulator.

    sanitize=True builds the kernels with AddressSanitizer + UBSan (run the process with
    `python -m minisd.cuda.emu.asan python ...`; an error aborts it with a report naming the .cu line).
    enabled=False switches emulation off inside the block, whatever the environment says (tests use it to run
    the NumPy reference next to the emulated kernels).
    """
    global _emulation
    old = _emulation
    _emulation = "off" if not enabled else "sanitize" if sanitize else "emulate"
    try:
        yield
    finally:
        _emulation = old


def use_cuda_ops(x):
    """Should a hot op hand x to minisd.cuda? True for a CuPy array, and, while emulating, for a float32 NumPy
    array (the kernels are float32; float64 gradient checks keep the NumPy path even while emulating)."""
    if is_cuda(x):
        return True
    return emulation_mode() is not None and isinstance(x, np.ndarray) and x.dtype == np.float32

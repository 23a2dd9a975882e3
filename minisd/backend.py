"""Array backend: NumPy (the spec) or CuPy (the GPU path). One question answered in one place.

Models and pipelines are written against an "array module" `xp` so the same code runs on numpy or cupy
arrays. Hot ops (conv, attention, GroupNorm, ...) ask `is_cuda(x)` once at their top and hand the work to
the CUDA kernels in minisd/cuda/; everything else just uses `xp_of(x)`.
"""
import numpy as np


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

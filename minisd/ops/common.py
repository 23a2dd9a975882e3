"""Shared helpers for every op: argument checks with teaching error messages, and a small thread pool.

Glossary used across minisd/ops: N=batch, C=channels, H,W=height,width, G=groups, L=query tokens,
S=key/value tokens, D=model width, h=heads, d=head dim, K=kernel size.

Why a thread pool: NumPy's BLAS calls (matmul) already use every core, but ufuncs (exp, multiply, ...)
and reductions run on one thread. They release the GIL, so splitting a big elementwise job into one
slice per core with plain Python threads gives close to a linear speed-up on the 2-core CI machines.
Only the hot paths use it (GroupNorm, SiLU, attention softmax); everything else stays plain NumPy.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


# ----------------------------------------------------------------------------------------------------------------
# argument checks: every message names the op, the argument, what was expected and what was given

def check_ndim(op, name, x, ndim):
    """Raise ValueError unless `x` has `ndim` dimensions (an int or a tuple of allowed ints)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed)
        raise ValueError(f"{op}: argument '{name}' must be {want}, got shape {tuple(x.shape)}")


def check_shape(op, name, x, expected):
    """Raise ValueError unless x.shape matches `expected`; None in `expected` matches any size.

    >>> check_shape("conv2d", "w", np.zeros((8, 3, 3, 3)), (None, 4, 3, 3))
    Traceback (most recent call last):
    ValueError: conv2d: argument 'w' must have shape (*, 4, 3, 3), got (8, 3, 3, 3)
    """
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        if len(expected) == 1:
            want = want[:-1] + ",)"
        raise ValueError(f"{op}: argument '{name}' must have shape {want}, got {shape}")


def check_float(op, **arrays):
    """Raise ValueError unless all given arrays share one floating dtype (float16/32/64). Returns that dtype.

    minisd never silently promotes: a float64 weight meeting a float32 activation is a bug (it doubles memory
    and hides precision problems), so it is reported instead of computed.
    """
    dtype = None
    for name, a in arrays.items():
        if a is None:
            continue
        if a.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: argument '{name}' must be a float array, got dtype {a.dtype}")
        if dtype is None:
            dtype, first = a.dtype, name
        elif a.dtype != dtype:
            raise ValueError(f"{op}: argument '{name}' has dtype {a.dtype} but '{first}' has {dtype}; "
                             f"convert one of them (e.g. .astype(np.float32))")
    return dtype


# ----------------------------------------------------------------------------------------------------------------
# threads

def num_threads():
    """Threads used for elementwise work: $MINISD_NUM_THREADS, else the number of CPUs this process may use."""
    env = os.environ.get("MINISD_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="minisd")
    return _POOL


def parallel_for(n, fn, min_chunk=1):
    """Call fn(start, stop) on contiguous slices covering range(n), one slice per thread; wait for all.

    fn must write only to its own slice of any output (no shared accumulators), so results are identical
    to a serial run whatever the thread count. Falls back to a single call for small n.
    """
    t = min(num_threads(), max(1, n // max(1, min_chunk)))
    if t <= 1:
        fn(0, n)
        return
    bounds = [n * i // t for i in range(t + 1)]
    futures = [_pool().submit(fn, bounds[i], bounds[i + 1]) for i in range(1, t)]
    fn(bounds[0], bounds[1])  # the calling thread takes the first slice
    for f in futures:
        f.result()  # re-raises any exception from a worker

"""Verification helpers shared by the tests, the benchmarks and `minisd verify`.

rel_error is the one error measure minisd quotes everywhere: max |a - b| normalised by the scale of the
reference, so it is meaningful for tensors whose entries cross zero (an elementwise relative error
blows up there). numerical_gradient is the float64 central-difference check every op must pass
(CS231n's eval_numerical_gradient_array, written here for arrays of any shape).
"""
import numpy as np


def rel_error(a, ref):
    """max |a - ref| / max |ref| (0 if both are all zero). Both are converted to float64 first."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        raise ValueError(f"rel_error: shapes differ: {a.shape} vs reference {ref.shape}")
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    diff = np.max(np.abs(a - ref)) if a.size else 0.0
    if scale == 0.0:
        return float(diff)
    return float(diff / scale)


def numerical_gradient(f, x, dy, h=1e-6):
    """Central-difference gradient of sum(f(x) * dy) with respect to x (perturbed in place, then restored).

    f: callable taking no arguments that reads x (so the same function can check any of several inputs);
    x: float64 array; dy: array shaped like f()'s output. Cost: 2 * x.size calls of f.
    """
    if x.dtype != np.float64:
        raise ValueError("numerical_gradient: use float64 inputs; float32 differences are too noisy")
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = np.sum(np.asarray(f()) * dy)
        x[i] = old - h
        fm = np.sum(np.asarray(f()) * dy)
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
        it.iternext()
    return grad

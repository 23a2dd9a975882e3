"""minisd's GPU path: hand-written CUDA kernels (kernels/*.cu) launched through CuPy, or through the CPU emulator.

    import minisd.cuda
    minisd.cuda.require_gpu()                 # the cupy module, or a UserError saying what to install
    with minisd.cuda.emulate():               # run the kernels on float32 NumPy arrays in the CPU emulator
        y, cache = minisd.cuda.ops.softmax_forward(x)

The NumPy ops (minisd/ops/) are the spec; each hot op checks `minisd.backend.use_cuda_ops(x)` at its top and
hands over to `minisd.cuda.ops` (the one dispatch point, DEVELOPERS.md §6). Importing this package never imports
CuPy: that happens only when a CuPy array reaches a kernel or require_gpu() is called.

Files: launch.py (targets, module cache, output allocation), ops.py (the ops: validation, launch configuration).
"""
from ..backend import emulate, emulation_mode, use_cuda_ops
from . import ops
from .launch import gpu_available, require_gpu

__all__ = ["emulate", "emulation_mode", "use_cuda_ops", "gpu_available", "require_gpu", "ops"]

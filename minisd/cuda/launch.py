"""Where a kernel runs, and the cached modules: real CuPy on a GPU, or the CPU emulator on NumPy arrays.

    k = get_kernel("softmax", "softmax_forward_v3", x)   # x decides the target: CuPy array -> GPU
    k(grid, block, (x, y, np.int32(M), np.int32(S)))     # same call for cupy.RawKernel and EmuRawKernel

Targets:
  * "cupy": cupy.RawModule(code=<the .cu text>, options=kernels.NVRTC_OPTIONS). The text is read from the file
    and passed as `code=` (RawModule's `path=` is only for cubin/ptx files); CuPy compiles it with NVRTC on first
    use and caches the binary on disk itself.
  * "emulate" / "sanitize": minisd.cuda.emu.EmuRawModule on the same text (sanitize: ASan+UBSan build). The emulator
    refuses launches a GPU would refuse, using the register and shared-memory usage that ptxas reported for sm_90
    (kernels/resources_baseline.json, kept current by the compile gate).
Modules are built once per (source, target) and process.

Outputs: `empty()` allocates kernel outputs. While emulating, or with MINISD_CUDA_POISON=1 on a GPU, they are
filled with NaN first, so a test can assert that a kernel wrote every element ("all finite").
"""
import json
import os
import threading

import numpy as np

from .. import backend
from ..errors import UserError

_INSTALL = ("install CuPy for your CUDA driver: `pip install cupy-cuda13x` (NVIDIA driver >= 580, CUDA 13) or "
            "`pip install cupy-cuda12x` (CUDA 12 drivers)")


def require_gpu():
    """The cupy module, after checking that CuPy is installed and a CUDA device answers. Raises UserError (with
    what to install) otherwise; never a traceback from deep inside CuPy."""
    try:
        import cupy
    except ImportError:
        raise UserError(f"the GPU path needs CuPy, which is not installed: {_INSTALL}. Without a GPU, minisd runs "
                        f"on the CPU (NumPy); MINISD_CUDA_EMULATE=1 runs the CUDA kernels in the CPU emulator "
                        f"(for testing).") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device node
        raise UserError(f"CuPy is installed but no CUDA device is usable ({type(e).__name__}: {e}). Check that "
                        f"`nvidia-smi` lists a GPU and that the NVIDIA driver matches your CuPy build "
                        f"(cupy-cuda13x needs driver >= 580; otherwise {_INSTALL}).") from None
    if count < 1:
        raise UserError("CuPy found no CUDA device (`nvidia-smi` should list one); run on the CPU instead.")
    return cupy


def gpu_available():
    """True if CuPy is installed and a CUDA device is usable (never raises)."""
    try:
        require_gpu()
        return True
    except UserError:
        return False


def target_of(x, op="minisd.cuda"):
    """"cupy" for a CuPy array; "emulate" or "sanitize" for a NumPy array while emulating; else ValueError."""
    if backend.is_cuda(x):
        return "cupy"
    mode = backend.emulation_mode()
    if mode is None:
        raise ValueError(f"{op}: got a {type(x).__module__}.{type(x).__name__}; the CUDA ops take CuPy arrays "
                         f"(or NumPy arrays inside `with minisd.cuda.emulate():` / MINISD_CUDA_EMULATE=1)")
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{op}: the emulator runs on NumPy arrays, got {type(x).__name__}")
    return mode


# ---------------------------------------------------------------------------------------------------------------
# modules

_modules = {}
_lock = threading.Lock()
_resources = None


def _kernels_package():
    """minisd.cuda.sources: where the .cu files are (imported late, so `import minisd` stays cheap)."""
    from . import sources
    return sources


def resources_sm90():
    """{file name: {kernel: {"regs", "smem"}}} for sm_90 from kernels/resources_baseline.json ({} if missing)."""
    global _resources
    if _resources is None:
        path = _kernels_package().KERNEL_DIR / "resources_baseline.json"
        _resources = json.loads(path.read_text()).get("sm_90", {}) if path.exists() else {}
    return _resources


def get_module(source_name, target):
    """The module of kernels/<source_name>.cu for target "cupy", "emulate" or "sanitize" (built once)."""
    key = (source_name, target)
    with _lock:  # two threads must not build the same module twice
        mod = _modules.get(key)
        if mod is None:
            kernels = _kernels_package()  # imported late: `import minisd` stays cheap
            code = kernels.source(source_name)
            if target == "cupy":
                cupy = require_gpu()
                mod = cupy.RawModule(code=code, options=kernels.NVRTC_OPTIONS)
            else:
                from .emu import EmuRawModule
                mod = EmuRawModule(code, options=kernels.NVRTC_OPTIONS, name=f"kernels/{source_name}.cu",
                                   sanitize=(target == "sanitize"),
                                   resources=resources_sm90().get(f"{source_name}.cu", {}))
            _modules[key] = mod
    return mod


def get_kernel(source_name, kernel_name, x):
    """Kernel `kernel_name` of kernels/<source_name>.cu, on the target x lives on (see target_of)."""
    return get_module(source_name, target_of(x, kernel_name)).get_function(kernel_name)


# ---------------------------------------------------------------------------------------------------------------
# outputs

def poison_outputs():
    """Fill kernel outputs with NaN before launches? Yes while emulating, or when MINISD_CUDA_POISON=1."""
    return backend.emulation_mode() is not None or os.environ.get("MINISD_CUDA_POISON", "") == "1"


def empty(xp, shape, dtype=np.float32):
    """An output array for a kernel: uninitialised, or NaN-filled when poison_outputs()."""
    if poison_outputs():
        return xp.full(shape, np.nan, dtype=dtype)
    return xp.empty(shape, dtype=dtype)


def blocks(n, per_block):
    """ceil(n / per_block): the number of blocks that cover n items."""
    return -(-n // per_block)

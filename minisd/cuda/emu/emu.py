"""Run CUDA C kernels on the CPU with the same calls as cupy.RawModule, on NumPy arrays.

    mod = EmuRawModule(code=Path("kernels/softmax.cu").read_text(), name="kernels/softmax.cu")
    k = mod.get_function("softmax_forward_v3")              # like cupy.RawModule.get_function
    k((blocks,), (128,), (x, y, np.int32(M), np.int32(S)), shared_mem=0)   # like cupy.RawKernel.__call__

How: the unchanged .cu source is compiled by g++ with cuda_emu.h force-included (`-include`), into a shared
library loaded with ctypes; each CUDA thread runs as a fiber (see cuda_emu.h for the execution model). "Device
memory" is host memory: pointer arguments are NumPy arrays. The build is cached in
$MINISD_CACHE_DIR/cuda_emu (default ~/.cache/minisd/cuda_emu), keyed by a hash of the source, the flags, the
header and the compiler version.

What is refused *before* the launch (a GPU would silently compute garbage or fail with a vague error):
  * an argument that does not match the kernel's C signature, which the compiled module reports itself: the count;
    an array whose dtype differs from the pointee type (float32 array for `const float*`); a non-contiguous array;
    a read-only array for a non-const pointer; a scalar of the wrong type. CuPy passes a Python int as
    `long long` and a Python float as `double`, so a Python float for a `float` parameter reads garbage on the
    GPU: only NumPy scalars of the exact type (np.float32(eps), np.int32(n)) pass, or Python ints for 8-byte
    integer parameters and Python floats for `double` ones;
  * launch limits of the target GPU (H100, sm_90): block dimensions and size, grid dimensions,
    `__launch_bounds__`, registers x threads (given the ptxas resource usage from kernels/resources_baseline.json)
    and static + dynamic shared memory over 48 KiB unless the kernel opted in through
    `max_dynamic_shared_size_bytes`, exactly as on a real device.

Modes:
  * schedule: environment variable EMU_SCHED=forward|reverse|random (EMU_SEED=<int> for random), read at every
    launch. Correct kernels give identical results under all three; a missing barrier usually does not.
  * sanitize=True: build with -fsanitize=address,undefined. The ASan runtime must be loaded before Python
    starts, so run the process through `python -m minisd.cuda.emu.asan <command>` (see asan.py); errors then abort
    the process with a report naming the .cu line, so run such launches in a subprocess.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..sources import KERNEL_DIR, find_kernels

HEADER = KERNEL_DIR / "emu" / "cuda_emu.h"  # the C++ side of the emulator lives with the kernels

# Limits of the GPU the checks model: H100 (sm_90). The A100 (sm_80) has the same block/grid/register limits and
# 163 KiB instead of 227 KiB of opt-in shared memory per block.
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2 ** 31 - 1, 65535, 65535)
REGISTERS_PER_BLOCK = 65536
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
DEFAULT_SMEM_PER_BLOCK = 48 * 1024  # without cudaFuncAttributeMaxDynamicSharedMemorySize
MAX_OPTIN_SMEM_PER_BLOCK = 227 * 1024

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

# signature codes (cuda_emu.h: param_code) -> NumPy dtypes
_CODE_DTYPE = {"f4": np.float32, "f8": np.float64, "i1": np.int8, "i2": np.int16, "i4": np.int32, "i8": np.int64,
               "u1": np.uint8, "u2": np.uint16, "u4": np.uint32, "u8": np.uint64, "b1": np.bool_}
_CTYPES = {"f4": "float", "f8": "double", "i1": "signed char", "i2": "short", "i4": "int", "i8": "long long",
           "u1": "unsigned char", "u2": "unsigned short", "u4": "unsigned int", "u8": "unsigned long long",
           "b1": "bool", "v": "void"}


class EmuError(RuntimeError):
    """Base class of the emulator's errors."""


class EmuBuildError(EmuError):
    """g++ could not compile the kernel source with the emulator header."""


class EmuLaunchError(EmuError):
    """The launch would be refused by a real GPU (block too big, too many registers or too much shared memory)."""


class EmuArgumentError(EmuError, TypeError):
    """A kernel argument does not match the kernel's C signature."""


class EmuKernelError(EmuError):
    """The kernel failed while running: divergent barrier, deadlock, bad warp intrinsic use, __trap()."""


def cache_dir():
    """Where built modules are kept: $MINISD_CACHE_DIR/cuda_emu, else $XDG_CACHE_HOME or ~/.cache /minisd/cuda_emu."""
    root = os.environ.get("MINISD_CACHE_DIR")
    if root:
        return Path(root) / "cuda_emu"
    xdg = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(xdg) / "minisd" / "cuda_emu"


_COMPILER_ID = {}


def _compiler_id(cxx):
    """First line of `g++ --version` (part of the cache key: another compiler must rebuild)."""
    if cxx not in _COMPILER_ID:
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise EmuBuildError(f"the CUDA emulator needs a C++20 compiler ({cxx}): {e}. Install g++ >= 11 "
                                f"(Debian/Ubuntu: apt-get install g++) or set CXX.") from None
        _COMPILER_ID[cxx] = out.splitlines()[0] if out else cxx
    return _COMPILER_ID[cxx]


def asan_loaded():
    """True if the ASan runtime is in this process (needed to load a sanitize=True module)."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


class EmuRawModule:
    """cupy.RawModule(code=..., options=...) for the CPU emulator.

    code: the CUDA C source. options: NVRTC-style options; `-D NAME[=value]` is passed to g++, the rest is
    ignored (-I is refused: kernels have no #include). name: the file name shown in diagnostics and sanitizer
    reports (use the .cu's path). sanitize: ASan+UBSan build (see the module docstring). resources: {kernel:
    {"regs": int, "smem": static bytes}} from ptxas, used to refuse launches a GPU would refuse. defines: extra
    preprocessor names (e.g. to switch on an injected bug). cxx: the compiler (default $CXX or g++).
    """

    def __init__(self, code, options=(), *, name="kernel.cu", sanitize=False, resources=None, defines=(),
                 cxx=None):
        self.code = code
        self.name = name
        self.sanitize = bool(sanitize)
        self.resources = dict(resources or {})
        self.launch_bounds = find_kernels(code)  # {kernel: max threads or None}; checks extern "C"
        if not self.launch_bounds:
            raise EmuBuildError(f'{name}: no extern "C" __global__ kernel found')
        flags = ["-std=c++20", "-fPIC", "-shared", "-w", "-fno-strict-aliasing", "-ffp-contract=off",
                 "-include", str(HEADER)]
        opts = list(options)
        while opts:
            o = opts.pop(0)
            if o == "-D" and opts:
                flags.append("-D" + opts.pop(0))
            elif o.startswith(("-D", "--define-macro=")):
                flags.append("-D" + o.split("=", 1)[1] if o.startswith("--define-macro=") else o)
            elif o.startswith("-I") or o.startswith("--include-path"):
                raise EmuBuildError(f"{name}: option {o!r}: minisd kernels have no #include, so no include path")
        flags += ["-D" + d for d in defines]
        if self.sanitize:
            if not asan_loaded():
                raise EmuError("sanitize=True needs the ASan runtime loaded before Python starts: run the command "
                               "as `python -m minisd.cuda.emu.asan <command>` (it sets LD_PRELOAD to g++'s libasan.so)")
            flags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                      "-fno-omit-frame-pointer"]
        else:
            flags += ["-O2"]
        cxx = cxx or os.environ.get("CXX", "g++")
        header = HEADER.read_text()
        key = hashlib.sha256("\0".join([code, name, repr(flags), header, _compiler_id(cxx)]).encode()).hexdigest()
        out_dir = cache_dir()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError:  # e.g. a read-only home directory in a container: fall back to a private temp folder
            out_dir = Path(tempfile.gettempdir()) / f"minisd-cuda_emu-{os.getuid()}"
            out_dir.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"\W", "_", Path(name).stem)
        self.path = out_dir / f"{stem}_{key[:20]}{'_asan' if self.sanitize else ''}.so"
        self.built = False  # whether this construction ran the compiler (False: cache hit)
        if not self.path.exists():
            self._build(cxx, flags)
            self.built = True
        self._lib = ctypes.CDLL(str(self.path))
        self._lib.emu_last_error.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._kernels = {}

    def _build(self, cxx, flags):
        # #line makes every diagnostic, __builtin_FILE() and sanitizer report name the .cu file and its lines.
        text = f'#line 1 "{self.name}"\n{self.code}\n#line 1 "<emu exports>"\n'
        text += "".join(f"EMU_EXPORT({k})\n" for k in self.launch_bounds)
        tag = f"{os.getpid()}_{id(self)}"  # unique temporaries: parallel test processes may build the same key
        cpp = self.path.with_name(f"{self.path.stem}.{tag}.cpp")
        tmp = self.path.with_name(f"{self.path.stem}.{tag}.tmp")
        cpp.write_text(text)
        try:
            r = subprocess.run([cxx, *flags, "-x", "c++", str(cpp), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode:
                raise EmuBuildError(f"{self.name}: g++ with the CUDA emulator header failed:\n{r.stderr[-6000:]}")
            os.replace(tmp, self.path)  # atomic: a concurrent reader never sees a half-written library
        finally:
            cpp.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)

    def get_function(self, name):
        """The kernel `name` (an extern "C" __global__ function of the source), like RawModule.get_function."""
        if name not in self.launch_bounds:
            raise EmuError(f"{self.name}: no kernel {name!r}; kernels in this module: {sorted(self.launch_bounds)}")
        if name not in self._kernels:
            self._kernels[name] = EmuRawKernel(self, name)
        return self._kernels[name]


class EmuRawKernel:
    """One kernel of an EmuRawModule; call it like cupy.RawKernel: k(grid, block, args, shared_mem=0)."""

    def __init__(self, module, name):
        self.module, self.name = module, name
        buf = ctypes.create_string_buffer(1024)
        getattr(module._lib, f"emu_signature_{name}")(buf, len(buf))
        self.signature = buf.value.decode().split(",") if buf.value else []
        self._launch = getattr(module._lib, f"emu_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                                 ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        self._launch.restype = ctypes.c_int
        # As cupy.RawKernel: set it to opt in to more than 48 KiB of dynamic shared memory.
        self.max_dynamic_shared_size_bytes = None

    def __repr__(self):
        return f"<EmuRawKernel {self.name}({', '.join(map(_describe_code, self.signature))}) from {self.module.name}>"

    # ---------------------------------------------------------------------------------------------- checks
    def _check_launch(self, grid, block, shared_mem):
        name = self.name
        for what, dims, limits in (("grid", grid, MAX_GRID_DIM), ("block", block, MAX_BLOCK_DIM)):
            for axis, d, lim in zip("xyz", dims, limits):
                if not isinstance(d, (int, np.integer)) or not 1 <= d <= lim:
                    raise EmuLaunchError(f"{name}: {what}.{axis} = {d!r}; it must be an int in [1, {lim}]")
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise EmuLaunchError(f"{name}: block {tuple(block)} has {threads} threads, more than the "
                                 f"{MAX_THREADS_PER_BLOCK} a block may have")
        bound = self.module.launch_bounds.get(name)
        if bound is not None and threads > bound:
            raise EmuLaunchError(f"{name}: block of {threads} threads exceeds the kernel's __launch_bounds__({bound}) "
                                 f"(the GPU refuses the launch)")
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise EmuLaunchError(f"{name}: shared_mem must be a non-negative int (bytes), got {shared_mem!r}")
        res = self.module.resources.get(name)
        if res is None:
            return
        regs = int(res.get("regs", 0))
        warps = -(-threads // 32)
        per_warp = -(-regs * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
        if warps * per_warp > REGISTERS_PER_BLOCK:
            raise EmuLaunchError(f"{name}: {regs} registers x {threads} threads needs {warps * per_warp} registers, "
                                 f"more than the {REGISTERS_PER_BLOCK} of a block (CUDA error: too many resources "
                                 f"requested for launch); use smaller blocks")
        static = int(res.get("smem", 0))
        optin = self.max_dynamic_shared_size_bytes
        limit = DEFAULT_SMEM_PER_BLOCK if optin is None else min(MAX_OPTIN_SMEM_PER_BLOCK, static + int(optin))
        if optin is not None and shared_mem > optin:
            raise EmuLaunchError(f"{name}: {shared_mem} bytes of dynamic shared memory requested but "
                                 f"max_dynamic_shared_size_bytes is {optin}")
        if static + shared_mem > limit:
            raise EmuLaunchError(f"{name}: {static} bytes static + {shared_mem} bytes dynamic shared memory exceeds "
                                 f"{limit} bytes per block" + (
                                     "; set kernel.max_dynamic_shared_size_bytes to opt in to more (up to "
                                     f"{MAX_OPTIN_SMEM_PER_BLOCK})" if optin is None else ""))

    def _pack(self, args):
        """Check args against the C signature; return (params array for the launcher, objects to keep alive)."""
        name, sig = self.name, self.signature
        if not isinstance(args, (tuple, list)):
            raise EmuArgumentError(f"{name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(sig):
            raise EmuArgumentError(f"{name}: takes {len(sig)} arguments ({', '.join(map(_describe_code, sig))}), "
                                   f"got {len(args)}")
        params = (ctypes.c_void_p * max(1, len(args)))()
        keep = []
        for i, (a, code) in enumerate(zip(args, sig)):
            want = _describe_code(code)
            if code.startswith("*"):
                const = code.startswith("*c")
                elem = code[2:] if const else code[1:]
                if a is None:
                    box = ctypes.c_void_p(0)
                elif isinstance(a, np.ndarray):
                    if not a.flags.c_contiguous:
                        raise EmuArgumentError(f"{name} argument {i} ({want}): array is not C-contiguous; the kernel "
                                               f"indexes it as dense memory (pass np.ascontiguousarray(x))")
                    if elem in _CODE_DTYPE and a.dtype != np.dtype(_CODE_DTYPE[elem]):
                        raise EmuArgumentError(f"{name} argument {i} ({want}): array of dtype {a.dtype}, expected "
                                               f"{np.dtype(_CODE_DTYPE[elem])}")
                    if not const and not a.flags.writeable:
                        raise EmuArgumentError(f"{name} argument {i} ({want}): read-only array for a non-const "
                                               f"pointer the kernel may write through")
                    box = ctypes.c_void_p(a.ctypes.data)
                    keep.append(a)
                else:
                    raise EmuArgumentError(f"{name} argument {i} ({want}): expected a NumPy array (device memory "
                                           f"in the emulator), got {type(a).__name__}")
                keep.append(box)
                params[i] = ctypes.addressof(box)  # params[i] points at the pointer value
                continue
            if code not in _CODE_DTYPE:
                raise EmuArgumentError(f"{name} argument {i}: parameters of type {want} cannot be passed from Python")
            target = np.dtype(_CODE_DTYPE[code])
            if isinstance(a, np.generic):
                got, how = a.dtype, f"NumPy scalar of dtype {a.dtype}"
            elif isinstance(a, bool):
                got, how = np.dtype(np.bool_), "Python bool"
            elif isinstance(a, int):
                got, how = np.dtype(np.int64), "Python int (CuPy passes it as long long)"
            elif isinstance(a, float):
                got, how = np.dtype(np.float64), "Python float (CuPy passes it as double)"
            else:
                raise EmuArgumentError(f"{name} argument {i} ({want}): expected a scalar, got {type(a).__name__}")
            if got != target:
                raise EmuArgumentError(f"{name} argument {i} ({want}): got a {how}; pass "
                                       f"np.{target.name}(value) so the GPU reads the right bytes")
            value = np.array(a, dtype=target)  # 0-d buffer holding the value
            keep.append(value)
            params[i] = value.ctypes.data  # params[i] points at the value
        return params, keep

    # ---------------------------------------------------------------------------------------------- launch
    def __call__(self, grid, block, args, shared_mem=0):
        grid = _dim3(grid, "grid", self.name)
        block = _dim3(block, "block", self.name)
        self._check_launch(grid, block, shared_mem)
        params, keep = self._pack(args)
        sched_name = os.environ.get("EMU_SCHED", "forward") or "forward"
        if sched_name not in SCHEDULES:
            raise EmuError(f"EMU_SCHED={sched_name!r}: expected one of {sorted(SCHEDULES)}")
        seed = int(os.environ.get("EMU_SEED", "0"))
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        rc = self._launch(g, b, int(shared_mem), SCHEDULES[sched_name], seed & 0xFFFFFFFF, params)
        del keep  # the arrays and scalar buffers had to live until the launch returned
        if rc:
            buf = ctypes.create_string_buffer(4096)
            self.module._lib.emu_last_error(buf, len(buf))
            raise EmuKernelError(f"{self.name}: {buf.value.decode(errors='replace')}")


def _dim3(v, what, name):
    """(x,), (x, y), (x, y, z) or an int -> (x, y, z) as in CuPy."""
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3:
        raise EmuLaunchError(f"{name}: {what} must have 1 to 3 dimensions, got {v!r}")
    return t + (1,) * (3 - len(t))


def _describe_code(code):
    """Signature code -> C type, e.g. "*cf4" -> "const float*"."""
    if code.startswith("*"):
        const = code.startswith("*c")
        elem = code[2:] if const else code[1:]
        return ("const " if const else "") + _CTYPES.get(elem, f"struct of {elem[1:]} bytes") + "*"
    return _CTYPES.get(code, f"struct of {code[1:]} bytes")

"""minisd's CUDA C kernels: one `.cu` file per op family, plus the tools that check them without a GPU.

    kernels/groupnorm.cu, layernorm.cu, softmax.cu, geglu.cu   the kernels (CuPy loads them with RawModule)
    kernels/emu/                                               CPU emulator that runs the same .cu files
    kernels/gate.py                                            NVRTC compile gate: `python -m kernels.gate`
    kernels/resources_baseline.json                            registers / shared memory per kernel (the gate's baseline)
    kernels/bugs/                                              deliberately broken kernels: test fixtures for the tools

Conventions every .cu follows (kernels/README.md explains why): no `#include`; every kernel is
`extern "C" __global__` (no C++ name mangling, so CuPy and the emulator find it by name); dynamic shared memory is
declared with `EMU_EXTERN_SHARED(type, name)`; float32 first; the file opens with a comment giving what it
computes, the shapes, the NumPy reference it must match and a version history; the production kernel keeps its
version number in its name (`groupnorm_forward_v2`), older versions stay in the file and are tested too.

This package needs only the standard library (numpy for the emulator); minisd.cuda uses it to find the sources.
"""
import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent

# Options every compile of a minisd kernel uses: by cupy.RawModule on the GPU and by the NVRTC gate. No fast-math:
# the kernels must agree with the NumPy reference to ~1e-6, and they are memory-bound, so it would buy nothing.
NVRTC_OPTIONS = ("--std=c++17",)


def source(name):
    """Text of kernels/<name>.cu (name with or without the .cu suffix; "bugs/missing_sync" for a fixture)."""
    path = KERNEL_DIR / (name if name.endswith(".cu") else name + ".cu")
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in KERNEL_DIR.glob("*.cu")))
        raise FileNotFoundError(f"kernels: no kernel source {path.name!r} in {path.parent} (have: {have})")
    return path.read_text()


def sources(include_bugs=False):
    """Paths of every production .cu file (sorted), plus kernels/bugs/*.cu when include_bugs."""
    paths = sorted(KERNEL_DIR.glob("*.cu"))
    if include_bugs:
        paths += sorted((KERNEL_DIR / "bugs").glob("*.cu"))
    return paths


def strip_comments(code):
    """The source with // and /* */ comments replaced by spaces (newlines kept, so line numbers still match)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    # string literals are matched first so that a "//" inside a string does not start a comment
    return re.sub(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/',
                  lambda m: m.group(0) if m.group(0).startswith('"') else blank(m), code, flags=re.S)


_GLOBAL_RE = re.compile(r'(extern\s+"C"\s+)?__global__\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?void\s+'
                        r'(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\(')


def find_kernels(code):
    """{kernel name: max threads per block from __launch_bounds__ or None} for every __global__ function.

    Raises ValueError for a __global__ function that is not extern "C": its C++-mangled name could not be
    found by cupy.RawModule.get_function or by the emulator.
    """
    code = strip_comments(code)
    defines = dict(re.findall(r"^\s*#\s*define\s+(\w+)\s+(\d+)\s*$", code, flags=re.M))
    found = {}
    for m in _GLOBAL_RE.finditer(code):
        extern_c, lb1, lb2, name = m.groups()
        if not extern_c:
            raise ValueError(f'kernel {name!r} must be declared extern "C" __global__ (minisd convention: '
                             f"CuPy finds kernels by their unmangled C name)")
        bounds = (lb1 or lb2 or "").split(",")[0].strip()
        bounds = defines.get(bounds, bounds)  # __launch_bounds__(BLOCK) with #define BLOCK 256
        found[name] = int(bounds, 0) if bounds.isdigit() else None
    return found

"""Where minisd's CUDA C kernels live, and how their source is read: one `.cu` file per op family.

    kernels/groupnorm.cu, layernorm.cu, softmax.cu, geglu.cu, conv2d.cu, attention.cu
                                      the kernels (CuPy loads them with RawModule; the emulator compiles them with g++)
    kernels/emu/cuda_emu.h            the C++ side of the CPU emulator (minisd/cuda/emu/ is its Python side)
    kernels/resources_baseline.json   registers / shared memory per kernel (the baseline of minisd/cuda/gate.py)
    kernels/bugs/                     deliberately broken kernels: test fixtures for the tools

`kernels/` is a folder of sources, not a Python package: an importable top-level `kernels` would shadow the
Hugging Face package of that name, which transformers imports. In a source checkout KERNEL_DIR is the repository's
`kernels/`; an installed wheel carries a copy in `minisd/cuda/kernels/` (setup.py copies it at build time).

Conventions every .cu follows (kernels/README.md explains why): no `#include`; every kernel is
`extern "C" __global__` (no C++ name mangling, so CuPy and the emulator find it by name); dynamic shared memory is
declared with `EMU_EXTERN_SHARED(type, name)`; float32 first; the file opens with a comment giving what it
computes, the shapes, the NumPy reference it must match and a version history; the production kernel keeps its
version number in its name (`groupnorm_forward_v2`), older versions stay in the file and are tested too.

This module needs only the standard library.
"""
import re
from pathlib import Path


def _kernel_dir():
    """The repository's kernels/ (source checkout, editable install), else the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent  # minisd/cuda
    for candidate in (here.parent.parent / "kernels", here / "kernels"):
        if (candidate / "emu" / "cuda_emu.h").is_file():
            return candidate
    return here.parent.parent / "kernels"  # missing: source() says what is absent


KERNEL_DIR = _kernel_dir()

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

"""minisd: Stable Diffusion from scratch in NumPy, with hand-written backward passes.

See README.md for the tour and DEVELOPERS.md for the conventions every file follows.
"""
import os
import sys

__version__ = "0.1.0"

# OpenBLAS (NumPy's BLAS) keeps its worker threads spinning for 2**28 CPU cycles (~0.1 s) after every matmul,
# waiting for the next one. minisd alternates matmuls with elementwise work that it splits over its own threads
# (softmax rows, GroupNorm, SiLU: minisd/ops/common.py), and on a 2-core machine the spinning BLAS worker takes
# one of the two cores from them. OPENBLAS_THREAD_TIMEOUT=12 (2**12 cycles, about a microsecond) lets idle BLAS
# workers sleep almost at once. Measured on the 2-core CI machine, minisd time / torch time in the same runs
# (benchmarks/README.md): SD 1.5 self-attention forward 1.97 and 2.43 unset, 1.58 and 1.63 with 12 (1.55 and 1.59
# with 4, no better); the CIFAR U-Net training step 2.01 unset, 1.74-1.76 with 12. OpenBLAS reads the variable once, when NumPy loads it, so this only takes effect when
# minisd is imported before numpy (the `minisd` command always is); otherwise export it yourself. A value the
# user has set is kept.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

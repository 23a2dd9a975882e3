# Source of notebooks/08_kernels.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 8. The CUDA kernels, run on the CPU
#
# minisd's GPU path replaces the hot NumPy ops with hand-written CUDA C kernels in [`kernels/`](../kernels/): one
# `.cu` file per op, every version kept (v1 is a naive port of the math, later versions are faster), the NumPy op
# as the spec. Most readers (and CI) have no GPU, so minisd ships a **CPU emulator** that compiles the *unchanged*
# `.cu` source with g++ and runs each CUDA thread as a fiber ([`minisd/cuda/emu/`](../minisd/cuda/emu/) and
# [`kernels/emu/cuda_emu.h`](../kernels/emu/cuda_emu.h), explained in
# [kernels/README.md](../kernels/README.md)). Inside `with minisd.cuda.emulate():` the launch code in
# `minisd/cuda/` sends float32 NumPy arrays to the emulated kernels exactly as it sends CuPy arrays to a GPU.
#
# This notebook runs the convolution and attention kernels on the emulator, checks them against the NumPy ops, and
# makes their parallel structure visible: which block computes which outputs, how the work is tiled, and how the
# attention kernel's online softmax works. It needs g++ (C++20) and no data; the first run compiles the kernels
# (about 20 s), then it takes a few seconds.

# %%
import contextlib
import json

import numpy as np
import matplotlib.pyplot as plt

import minisd.cuda
from minisd.cuda import sources as kernels  # where the .cu files are: kernels.sources(), kernels.KERNEL_DIR
from minisd.cuda import attention as cuda_attention, conv as cuda_conv
from minisd.ops.attention import attention_forward
from minisd.ops.conv import conv2d_forward
from minisd.testing import rel_error

rng = np.random.default_rng(0)
print("kernel sources:", ", ".join(p.name for p in kernels.sources()))

# %% [markdown]
# ## A convolution on the emulator
#
# `kernels/conv2d.cu` computes a convolution as an **implicit GEMM**: the output, viewed as a matrix
# $C$ of $C_\text{out}$ rows by $N H_o W_o$ pixel columns, is $C = A B$ with $A$ the weights viewed as
# $(C_\text{out}, C K_h K_w)$ and $B$ the im2col matrix, whose entries are gathered from $x$ on the fly and never stored
# (the NumPy op builds it chunk by chunk; [docs/backward_conv.md](../docs/backward_conv.md)). Three versions:
# v1, one thread per output element; v2 (production), 64x64 output tiles per block; v3, 128x128 tiles, a candidate
# waiting for GPU measurements. All three must agree with the NumPy op:

# %%
x = rng.standard_normal((2, 8, 10, 9)).astype(np.float32)  # N=2, C=8, 10x9 images
w = rng.standard_normal((100, 8, 3, 3)).astype(np.float32)  # Cout=100, 3x3
b = rng.standard_normal(100).astype(np.float32)
reference, _ = conv2d_forward(x, w, b, stride=1, padding=1)  # the NumPy op (Winograd or im2col + BLAS)
with minisd.cuda.emulate():
    for version in (1, 2, 3):
        y, _ = minisd.cuda.ops.conv2d_forward(x, w, b, stride=1, padding=1, version=version)
        print(f"conv2d_forward_v{version}: rel_error vs NumPy = {rel_error(y, reference):.1e}")

# %% [markdown]
# Agreement to float32 rounding: the sums are the same, taken in a different order.
#
# ## Which block computes which outputs
#
# A kernel launch is a grid of blocks of threads; every thread runs the same code and finds its work from
# `blockIdx` and `threadIdx`. To *see* the assignment without reading the index arithmetic, we record the launch
# the library makes (grid, block size, arguments), then replay it with a smaller grid. The emulator fills every
# output with NaN before a launch, exactly so that tests can check that a kernel wrote everything; here it tells us
# which outputs a given set of blocks wrote. Block $(b_x, b_y)$'s outputs are those written with the grid cut to
# $(b_x{+}1, b_y{+}1)$ but not with $(b_x, b_y{+}1)$ or $(b_x{+}1, b_y)$.

# %%
@contextlib.contextmanager
def recording(module):
    """Record the kernel launches of a minisd.cuda launch module: a list of (kernel name, kernel, grid, block,
    args, keyword args). The kernels run as usual; only get_kernel is wrapped for the duration."""
    launches, real_get_kernel = [], module.get_kernel

    def get_kernel(source, name, x):
        kernel = real_get_kernel(source, name, x)

        def launch(grid, block, args, **kw):
            launches.append((name, kernel, grid, block, args, kw))
            return kernel(grid, block, args, **kw)
        return launch

    module.get_kernel = get_kernel
    try:
        yield launches
    finally:
        module.get_kernel = real_get_kernel


def block_owner(launch, out):
    """Replay a recorded launch with cut grids -> array shaped like `out` holding the index of the block that
    wrote each element (blocks numbered x-fastest). `out` must be one of the launch's output arguments."""
    name, kernel, grid, block, args, kw = launch
    gx, gy = grid[0], (grid[1] if len(grid) > 1 else 1)

    def written(nx, ny):
        if nx == 0 or ny == 0:
            return np.zeros(out.shape, bool)
        out[...] = np.nan
        kernel((nx, ny) + tuple(grid[2:]), block, args, **kw)
        return np.isfinite(out)

    owner = np.full(out.shape, -1)
    for by in range(gy):
        for bx in range(gx):
            mine = written(bx + 1, by + 1) & ~written(bx, by + 1) & ~written(bx + 1, by)
            owner[mine] = by * gx + bx
    return owner


with minisd.cuda.emulate(), recording(cuda_conv) as launches:
    y, _ = minisd.cuda.ops.conv2d_forward(x, w, b, stride=1, padding=1, version=2, splits=1)
    name, _, grid, block, args, _ = launches[-1]
    print(f"{name}: grid {grid}, block {block}")
    owner = block_owner(launches[-1], y)  # (N, Cout, Ho, Wo)

gemm_view = owner.transpose(1, 0, 2, 3).reshape(100, -1)  # (Cout, N*Ho*Wo): the GEMM's output matrix C
plt.figure(figsize=(8, 3.2))
plt.imshow(gemm_view, cmap="tab10", aspect="auto", interpolation="nearest", vmin=0, vmax=9)
for k in np.unique(gemm_view):
    rows, cols = np.nonzero(gemm_view == k)
    plt.text(cols.mean(), rows.mean(), f"block {k}\n({k % grid[0]}, {k // grid[0]})", ha="center", va="center")
plt.xlabel("output pixel p = n * Ho * Wo + oh * Wo + ow  (GEMM column)")
plt.ylabel("output channel (GEMM row)")
plt.title("conv2d_forward_v2: each block owns a 64 x 64 tile of the output matrix")
plt.tight_layout()
plt.show()

# %% [markdown]
# Six blocks: $\lceil 180 / 64\rceil = 3$ tiles of pixels times $\lceil 100 / 64\rceil = 2$ tiles of channels; the tiles
# at the edges are partly empty (their threads check bounds and skip). Inside a block, the 256 threads form a
# 16 x 16 grid, and thread $(t_y, t_x)$ accumulates a **4 x 4 register tile**: channels $4t_y \dots 4t_y{+}3$ and pixels
# $t_x, t_x{+}16, t_x{+}32, t_x{+}48$ (from the kernel source, `conv2d_forward_v2`). Interleaving the pixel columns
# means the 16 threads of a half-warp write 16 *consecutive* pixels: coalesced stores.

# %%
tile = np.full((64, 64), -1)
for ty in range(16):
    for tx in range(16):
        for i in range(4):
            for c in range(4):
                tile[4 * ty + i, tx + 16 * c] = 16 * ty + tx  # thread id t = 16 ty + tx
top = tile[:16]  # rows 0-15 of the tile: the threads with ty = 0..3
plt.figure(figsize=(10, 2.8))
plt.imshow(top % 20, cmap="tab20", aspect="auto", interpolation="nearest")
for t in (0, 17):
    for r, c in np.argwhere(top == t):
        plt.text(c, r, str(t), ha="center", va="center", fontsize=6, color="black")
plt.title("rows 0-15 of a 64x64 output tile, coloured by thread (t = 16 ty + tx); the 16 outputs of threads 0 and 17 "
          "are numbered", fontsize=9)
plt.xlabel("pixel within the tile")
plt.ylabel("channel within the tile")
plt.tight_layout()
plt.show()

# %% [markdown]
# **The K loop.** Each output of the tile is a sum over $K = C K_h K_w$ products ($C \cdot 9 = 72$ here, 2880 for a
# 320-channel SD layer). The block walks $K$ in slices of 16: all 256 threads cooperatively load a 64 x 16 slice of
# $A$ and a 16 x 64 slice of $B$ into shared memory (each thread 4 + 4 values), wait at a barrier, and each thread
# does its 4 x 4 x 16 multiply-adds from shared memory. Every loaded value is reused by 16 threads, which is the
# point of tiling: global memory traffic drops 16-fold against v1, where each thread reads its whole row of $A$
# and column of $B$ itself.
#
# **Split-K.** At SD's low resolutions there are few tiles (a 1280-channel layer at 8x8 with batch 2 has
# $20 \times 2 = 40$), too few to fill a 132-SM H100. The launcher then also splits $K$ across blocks and sums their
# partial results in a fixed order (deterministic, unlike atomics). `choose_splits` decides:

# %%
print(f"{'SD 1.5 conv (batch 2)':34s} {'tiles':>6s} {'K':>6s} {'splits':>7s}")
layers = (("320 -> 320, 3x3, 64x64 latent", 320, 320, 64), ("640 -> 640, 3x3, 32x32", 640, 640, 32),
          ("1280 -> 1280, 3x3, 16x16", 1280, 1280, 16), ("1280 -> 1280, 3x3, 8x8", 1280, 1280, 8))
for label, cout, cin, side in layers:
    tiles = -(-cout // 64) * -(-(2 * side * side) // 64)
    K = cin * 9
    print(f"{label:34s} {tiles:6d} {K:6d} {cuda_conv.choose_splits(tiles, K, sms=132):7d}")

# %% [markdown]
# ## The attention kernel
#
# `kernels/attention.cu` fuses the whole of $\mathrm{softmax}(QK^\top/\sqrt d)\,V$ into one kernel per pass (the
# FlashAttention-2 scheme): the $(L, S)$ score matrix never exists in memory. v1 gives each thread one query row
# and walks all keys; v2 (production) gives each block 64 query rows of one head and streams the keys through
# shared memory 32 at a time. Both against the NumPy op, on a cross-attention shape (100 image tokens, 77 text
# tokens, 2 heads of 32):

# %%
q = rng.standard_normal((2, 100, 64)).astype(np.float32)
k = rng.standard_normal((2, 77, 64)).astype(np.float32)
v = rng.standard_normal((2, 77, 64)).astype(np.float32)
y_ref, cache_ref = attention_forward(q, k, v, num_heads=2)  # the NumPy op
with minisd.cuda.emulate():
    for version in (1, 2):
        y, cache = minisd.cuda.ops.attention_forward(q, k, v, num_heads=2, version=version)
        print(f"attention_forward_v{version}: rel_error(y) = {rel_error(y, y_ref):.1e}, "
              f"rel_error(log-sum-exp) = {rel_error(cache.lse, cache_ref.lse):.1e}")
    with recording(cuda_attention) as launches:
        y, _ = minisd.cuda.ops.attention_forward(q, k, v, num_heads=2, version=2)
        name, _, grid, block, _, _ = launches[-1]
        owner = block_owner(launches[-1], y)  # (N, L, h*d)
print(f"{name}: grid {grid} (query tiles, batch x heads), block {block}")
per_head = owner.reshape(2, 100, 2, 32)[..., 0].transpose(1, 0, 2).reshape(100, 4)  # (L, N*h): one column per head
plt.figure(figsize=(5.5, 3.2))
plt.imshow(per_head, cmap="tab10", aspect="auto", interpolation="nearest", vmin=0, vmax=9)
for blk in np.unique(per_head):
    rows, cols = np.nonzero(per_head == blk)
    plt.text(cols.mean(), rows.mean(), f"block ({blk % grid[0]}, {blk // grid[0]})", ha="center", va="center",
             fontsize=8)
plt.xticks(range(4), ["n=0, head 0", "n=0, head 1", "n=1, head 0", "n=1, head 1"], fontsize=8)
plt.ylabel("query row l")
plt.title("attention_forward_v2: block (query tile, batch * heads + head)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The online softmax
#
# A block holds 64 query rows but sees the keys only one 32-key tile at a time, so it cannot first find each row's
# maximum score and then sum the exponentials, as a plain softmax does. Instead each row keeps three running
# quantities (Milakov & Gimelshein 2018): the maximum $m$ so far, the sum $\ell = \sum e^{s - m}$ so far, and the
# unnormalised output $o = \sum e^{s-m} v$. When a new tile raises the maximum to $m'$, the old $\ell$ and $o$ are
# rescaled by $e^{m - m'}$ before the tile's terms are added:
#
# $$m' = \max(m, \max_{s\in\text{tile}} s),\qquad \ell' = e^{m-m'}\ell + \sum_{s\in\text{tile}} e^{s-m'},\qquad
# o' = e^{m-m'}o + \sum_{s \in\text{tile}} e^{s-m'}v_s ;$$
#
# at the end $y = o/\ell$, and $\mathrm{lse} = m + \log \ell$ is saved for the backward pass. Below, the running
# $m$ and $\ell$ of one query row, tile by tile, written out in NumPy from the scores of the NumPy op's cache (its
# `q` is already scaled, and its `lse` is the reference); the last value must match what both kernels returned.

# %%
scores = cache_ref.q[0, 5] @ cache_ref.k[0].T  # one query row (batch 0, head 0, l = 5) against the 77 keys
m, ell, history = -np.inf, 0.0, []
for start in range(0, 77, 32):  # the kernel's key tiles: 32, 32, 13
    tile_scores = scores[start:start + 32].astype(np.float64)
    m_new = max(m, tile_scores.max())
    ell = np.exp(m - m_new) * ell + np.exp(tile_scores - m_new).sum()
    m = m_new
    history.append((start, m, ell))
    print(f"after keys {start:2d}-{min(start + 32, 77) - 1:2d}: running max {m:7.4f}, running sum {ell:8.4f}, "
          f"m + log(sum) = {m + np.log(ell):.6f}")
print(f"lse of this row: NumPy op {cache_ref.lse[0, 5]:.6f}, kernel v2 {cache.lse[0, 5]:.6f}")

# %% [markdown]
# Subtracting the running maximum is what keeps $e^{s}$ finite. With scores in the hundreds (here: queries scaled
# up 40-fold), a softmax computed without it overflows float32 (whose exp overflows above 88.7), while the kernel,
# like the NumPy op, is unaffected:

# %%
big_q = 40 * q
raw = (big_q[0, :, :32] / np.float32(np.sqrt(32))) @ k[0, :, :32].T  # head 0's scores, (100, 77) float32
with np.errstate(over="ignore"):
    print(f"largest score {raw.max():.0f}; exp of the raw scores: {np.isinf(np.exp(raw)).sum()} of {raw.size} "
          f"entries overflow to inf")
y_ref, _ = attention_forward(big_q, k, v, num_heads=2)
with minisd.cuda.emulate():
    y, _ = minisd.cuda.ops.attention_forward(big_q, k, v, num_heads=2)
print(f"kernel v2 with large scores: all finite {np.isfinite(y).all()}, rel_error vs NumPy {rel_error(y, y_ref):.1e}")

# %% [markdown]
# ## GPU numbers
#
# The emulator establishes *correctness*: every version of every kernel is checked in `tests/test_cuda_*.py` against
# the NumPy op and PyTorch, under three thread orders and with AddressSanitizer. It says nothing about speed.
# Speed is measured on a GPU by `python benchmarks/gpu.py --all-versions` (and `bash scripts/gpu_check.sh` runs
# the whole GPU check); **no GPU timings have been recorded in the repository yet**, so none are shown here.
#
# What is measured without a GPU is each kernel's resource use, reported by NVIDIA's own compiler (NVRTC + ptxas
# for sm_90, the H100) and kept in `kernels/resources_baseline.json` by the compile gate (`python -m minisd.cuda.gate`).
# Registers per thread bound how many threads an SM can keep in flight (65,536 registers per SM), which is the
# first thing to look at when a kernel is slow:

# %%
baseline = json.loads((kernels.KERNEL_DIR / "resources_baseline.json").read_text())["sm_90"]
print(f"{'kernel (sm_90)':30s} {'registers/thread':>16s} {'static smem':>12s} {'threads/SM the registers allow':>31s}")
for fname in ("conv2d.cu", "attention.cu"):
    for kname, r in sorted(baseline[fname].items()):
        allocated = -(-r["regs"] // 8) * 8  # registers are allocated in units of 256 per warp = 8 per thread
        resident = min(2048, 65536 // allocated // 32 * 32)  # whole warps; an H100 SM holds at most 2048 threads
        print(f"{kname:30s} {r['regs']:16d} {r['smem']:10d} B {resident:20d} ({resident / 2048:4.0%} of 2048)")

# %% [markdown]
# (Dynamic shared memory, which the attention kernels size at launch from the head dimension, comes on top of the
# static amounts; `minisd/cuda/attention.py` computes it.) The naive v1 kernels are light (30-40 registers) but
# reread global memory for every multiply-add; the tiled v2/v3 kernels spend registers on their accumulator tiles
# (v3's 8 x 8 tile needs ~127) in exchange for reuse: the trade-off the GPU measurements will settle.
#
# ## Summary
#
# * The `.cu` kernels run unchanged on the CPU emulator and agree with the NumPy ops to float32 rounding.
# * Conv v2: each block owns a 64x64 tile of the implicit-GEMM output, each thread a 4x4 register tile; K is
#   streamed through shared memory in slices of 16; split-K fills the GPU at low resolutions.
# * Attention v2: each block owns 64 query rows of one head and streams keys in tiles of 32 with an online softmax,
#   so the score matrix never touches memory.

"""Ops: minisd's hand-written forward/backward vs PyTorch CPU (float32) at the shapes of the SD 1.5 U-Net.

    python benchmarks/ops.py                            # every case, fwd and fwd+bwd, with peak memory
    python benchmarks/ops.py --only attn --repeat 3     # cases whose name contains "attn"
    python benchmarks/ops.py --only "conv3x3 320" --repeat 1 --no-memory
    python benchmarks/ops.py --quick                    # tiny shapes: a smoke test of the script (seconds)
    BENCH_THREADS=1 python benchmarks/ops.py            # one thread each (default 2, see benchmarks/common.py)

Every case gets two rows, both libraries computing the same thing on the same float32 inputs:
  * fwd: the forward alone. minisd: `op_forward(...)` (which also returns its small backward cache: the cache
    costs what minisd's forward costs, so it is timed); torch: the same call under torch.no_grad().
  * fwd+bwd: the forward, then the gradient of every input and parameter for one fixed upstream gradient dy.
    minisd: `op_forward` then `op_backward(dy, cache)`; torch: the forward on requires_grad leaves, then
    torch.autograd.grad(y, leaves, dy) (fresh gradients, as minisd's backward returns, not accumulated .grad).
    Neither side's backward can be timed alone without the other side's forward, so compare fwd+bwd with
    fwd+bwd; the backward alone is roughly the difference of the two rows.

Cases (batch 2: the classifier-free-guidance batch of one 512x512 image, a 64x64 latent):
  conv3x3 C ch HxW      x (2, C, H, W), w (C, C, 3, 3), bias, stride 1, padding 1  vs F.conv2d
                        (320 ch at 64x64, 640 at 32x32, 1280 at 16x16 and at 8x8: the U-Net's ResBlock convs)
  groupnorm             x (2, 320, 64, 64), 32 groups, eps 1e-5, affine               vs F.group_norm
  layernorm             x (2, 4096, 320) over the last dim, eps 1e-5, affine          vs F.layer_norm
  self-attn             q, k, v (2, 4096, 320) = 8 heads x 40 (already projected)     vs SDPA
  cross-attn            q (2, 4096, 320), k, v (2, 77, 320), 8 heads x 40             vs SDPA
  geglu-ff              x (2, 4096, 320): linear 320->2560, GEGLU (value = first 1280 columns, gate = last
                        1280; value * gelu(gate), exact erf GELU), linear 1280->320   vs the same with F.linear,
                        chunk, F.gelu
minisd's attention takes and returns (N, L, h*d) and splits heads inside; the torch side does what diffusers'
AttnProcessor2_0 does around F.scaled_dot_product_attention (view + transpose to (N, h, L, d), and back), so
both time (N, L, 320) -> (N, L, 320).

Columns: "rel err" is max|minisd - torch| / max|torch|: of the output in fwd rows, the worst over all gradients
in fwd+bwd rows (checked once, before timing, so a benchmark of a wrong computation shows). Times are the best
of --repeat after a warm-up, minisd and torch timed interleaved in one process (common.best_times). "MiB" is
the peak RSS of that row's function (run twice) in a fresh process holding one library only
(common.run_isolated), minus the RSS after the imports: the inputs, outputs, caches, gradients and whatever
workspace the op allocates. Ratios are minisd / torch: > 1 means minisd is slower or uses more.
"""
import argparse
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import BENCH_THREADS, best_times, print_table, run_isolated  # noqa: E402  (sets thread variables first)

import numpy as np  # noqa: E402

from minisd.ops.activations import geglu_backward, geglu_forward  # noqa: E402
from minisd.ops.attention import attention_backward, attention_forward  # noqa: E402
from minisd.ops.conv import conv2d_backward, conv2d_forward  # noqa: E402
from minisd.ops.linear import linear_backward, linear_forward  # noqa: E402
from minisd.ops.norm import (group_norm_backward, group_norm_forward, layer_norm_backward,  # noqa: E402
                             layer_norm_forward)

EPS = 1e-5  # GroupNorm32 in the ResBlocks and every LayerNorm of the U-Net's transformer blocks
MODES = ("fwd", "fwd+bwd")

# Inputs and parameters of each kind, in the order both libraries return their gradients.
LEAVES = {"conv": ("x", "w", "b"), "group_norm": ("x", "gamma", "beta"), "layer_norm": ("x", "gamma", "beta"),
          "attention": ("q", "k", "v"), "geglu_ff": ("x", "w1", "b1", "w2", "b2")}


def cases(quick=False):
    """[(name, kind, shape parameters)]: SD 1.5 shapes, or tiny ones with quick (same kinds, same code paths
    where the shapes allow: conv 3x3 with padding, several heads, 77 keys)."""
    if quick:
        conv = [(16, 8), (32, 4), (64, 2), (64, 1)]
        gn, ln = dict(N=2, C=32, H=8, G=8), dict(N=2, L=64, D=16)
        att = [dict(N=2, L=64, S=64, h=2, d=8), dict(N=2, L=64, S=77, h=2, d=8)]
        ff = dict(N=2, L=64, D=16, F=32)
    else:
        conv = [(320, 64), (640, 32), (1280, 16), (1280, 8)]
        gn, ln = dict(N=2, C=320, H=64, G=32), dict(N=2, L=4096, D=320)
        att = [dict(N=2, L=4096, S=4096, h=8, d=40), dict(N=2, L=4096, S=77, h=8, d=40)]
        ff = dict(N=2, L=4096, D=320, F=1280)
    out = [(f"conv3x3 {C} ch {H}x{H}", "conv", dict(N=2, C=C, H=H)) for C, H in conv]
    out.append((f"groupnorm {gn['C']} ch {gn['H']}x{gn['H']} G={gn['G']}", "group_norm", gn))
    out.append((f"layernorm {ln['L']}x{ln['D']}", "layer_norm", ln))
    s, c = att
    out.append((f"self-attn {s['L']} tokens {s['h']}x{s['d']}", "attention", s))
    out.append((f"cross-attn {c['L']}x{c['S']} {c['h']}x{c['d']}", "attention", c))
    out.append((f"geglu-ff {ff['L']}x{ff['D']} ({ff['D']}->{2 * ff['F']}->{ff['F']}->{ff['D']})", "geglu_ff", ff))
    return out


def make_inputs(kind, p, seed=0):
    """The float32 inputs of one case as NumPy arrays, dy (the upstream gradient) included. Weights are scaled
    by 1/sqrt(fan_in) so every output is O(1), as in a trained network (no overflow, no denormals)."""
    g = np.random.default_rng(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (np.float32(shift) + np.float32(scale) * g.standard_normal(shape, dtype=np.float32))

    N = p["N"]
    if kind == "conv":
        C, H = p["C"], p["H"]
        return dict(x=randn(N, C, H, H), w=randn(C, C, 3, 3, scale=(9 * C) ** -0.5), b=randn(C, scale=0.1),
                    dy=randn(N, C, H, H))
    if kind == "group_norm":
        C, H = p["C"], p["H"]
        return dict(x=randn(N, C, H, H), gamma=randn(C, scale=0.1, shift=1.0), beta=randn(C, scale=0.1),
                    dy=randn(N, C, H, H))
    if kind == "layer_norm":
        L, D = p["L"], p["D"]
        return dict(x=randn(N, L, D), gamma=randn(D, scale=0.1, shift=1.0), beta=randn(D, scale=0.1),
                    dy=randn(N, L, D))
    if kind == "attention":
        L, S, D = p["L"], p["S"], p["h"] * p["d"]
        return dict(q=randn(N, L, D), k=randn(N, S, D), v=randn(N, S, D), dy=randn(N, L, D))
    if kind == "geglu_ff":
        L, D, F = p["L"], p["D"], p["F"]
        return dict(x=randn(N, L, D), w1=randn(2 * F, D, scale=D ** -0.5), b1=randn(2 * F, scale=0.1),
                    w2=randn(D, F, scale=F ** -0.5), b2=randn(D, scale=0.1), dy=randn(N, L, D))
    raise ValueError(f"unknown kind {kind!r}")


def minisd_pair(kind, a, p):
    """-> (forward() -> (y, cache), backward(dy, cache) -> gradients in LEAVES order) with minisd's ops."""
    if kind == "conv":
        return (lambda: conv2d_forward(a["x"], a["w"], a["b"], 1, 1)), conv2d_backward
    if kind == "group_norm":
        return (lambda: group_norm_forward(a["x"], a["gamma"], a["beta"], p["G"], EPS)), group_norm_backward
    if kind == "layer_norm":
        return (lambda: layer_norm_forward(a["x"], a["gamma"], a["beta"], EPS)), layer_norm_backward
    if kind == "attention":
        return (lambda: attention_forward(a["q"], a["k"], a["v"], p["h"])), attention_backward

    def ff_forward():  # the transformer block's FeedForward: proj (to 2F), GEGLU, out linear
        h, c1 = linear_forward(a["x"], a["w1"], a["b1"])  # (N, L, 2F)
        gl, c2 = geglu_forward(h)  # (N, L, F)
        y, c3 = linear_forward(gl, a["w2"], a["b2"])  # (N, L, D)
        return y, (c1, c2, c3)

    def ff_backward(dy, cache):  # reverse order of ff_forward
        c1, c2, c3 = cache
        dgl, dw2, db2 = linear_backward(dy, c3)
        dh = geglu_backward(dgl, c2)
        dx, dw1, db1 = linear_backward(dh, c1)
        return dx, dw1, db1, dw2, db2

    return ff_forward, ff_backward


def torch_op(kind, p):
    """The same computation in PyTorch: f(*leaves in LEAVES order) -> y."""
    import torch
    F = torch.nn.functional
    if kind == "conv":
        return lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=1)
    if kind == "group_norm":
        return lambda x, gamma, beta: F.group_norm(x, p["G"], gamma, beta, EPS)
    if kind == "layer_norm":
        return lambda x, gamma, beta: F.layer_norm(x, (x.shape[-1],), gamma, beta, EPS)
    if kind == "attention":
        h = p["h"]

        def attention(q, k, v):  # as diffusers' AttnProcessor2_0 around SDPA
            N, L, D = q.shape
            qh, kh, vh = (t.view(N, -1, h, D // h).transpose(1, 2) for t in (q, k, v))  # (N, h, T, d)
            y = F.scaled_dot_product_attention(qh, kh, vh)  # (N, h, L, d)
            return y.transpose(1, 2).reshape(N, L, D)  # (N, L, D)
        return attention

    def ff(x, w1, b1, w2, b2):  # diffusers GEGLU + FeedForward
        value, gate = F.linear(x, w1, b1).chunk(2, dim=-1)  # (N, L, F) each
        return F.linear(value * F.gelu(gate), w2, b2)  # (N, L, D)
    return ff


def functions(lib, kind, p, seed=0):
    """{"fwd": f, "fwd+bwd": f} for one library: f() returns the output, or the tuple of gradients."""
    a = make_inputs(kind, p, seed)
    if lib == "minisd":
        forward, backward = minisd_pair(kind, a, p)
        return {"fwd": lambda: forward()[0], "fwd+bwd": lambda: backward(a["dy"], forward()[1])}
    import torch
    f = torch_op(kind, p)
    leaves = [torch.from_numpy(a[n]).requires_grad_() for n in LEAVES[kind]]
    dy = torch.from_numpy(a["dy"])

    def fwd():
        with torch.no_grad():
            return f(*leaves)

    def fwd_bwd():
        return torch.autograd.grad(f(*leaves), leaves, dy)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def isolated_case(lib, kind, mode, params, seed=0):
    """A run_isolated case: one library, one row (setup here, the returned function is what gets measured)."""
    return functions(lib, kind, params, seed)[mode]


def _numpy(t):
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


def rel_err(got, ref):
    """max |got - ref| / max |ref|, the worst over the tensors when given tuples (gradients)."""
    got, ref = (got, ref) if isinstance(got, (tuple, list)) else ((got,), (ref,))
    if len(got) != len(ref):
        raise RuntimeError(f"minisd returned {len(got)} arrays, torch {len(ref)}")
    worst = 0.0
    for a, b in zip(got, ref):
        a, b = _numpy(a), _numpy(b)
        if a.shape != b.shape:
            raise RuntimeError(f"shape mismatch: minisd {a.shape}, torch {b.shape}")
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max()))
    return worst


def environment_line():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} logical CPUs; threads: {BENCH_THREADS} (BLAS, minisd pool, "
            f"torch.set_num_threads); numpy {np.__version__}, torch {torch.__version__}; float32")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="SUBSTRING", help="run only cases whose name contains one of these")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats per library (the best is reported)")
    ap.add_argument("--no-memory", action="store_true", help="skip the isolated peak-memory runs")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the script)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(BENCH_THREADS)
    todo = [c for c in cases(args.quick) if not args.only or any(s.lower() in c[0].lower() for s in args.only)]
    if not todo:
        ap.error(f"--only {args.only} matches none of: " + ", ".join(c[0] for c in cases(args.quick)))
    rows = []
    for name, kind, p in todo:
        fns = {"minisd": functions("minisd", kind, p), "torch": functions("torch", kind, p)}
        for mode in MODES:
            a, b = fns["minisd"][mode], fns["torch"][mode]
            err = rel_err(a(), b())  # also a warm-up call of each
            t = best_times({"minisd": a, "torch": b}, repeat=args.repeat, warmup=1)
            row = {"case": name, "pass": mode, "rel err": err, "minisd ms": 1e3 * t["minisd"],
                   "torch ms": 1e3 * t["torch"]}
            if not args.no_memory:
                for lib, imports in (("minisd", ("numpy",)), ("torch", ("numpy", "torch"))):
                    r = run_isolated(isolated_case, repeat=1, warmup=1, imports=imports, lib=lib, kind=kind,
                                     mode=mode, params=p)
                    row[f"{lib} MiB"] = r.net_mib
            rows.append(row)
            print(f"{name} {mode}: minisd {row['minisd ms']:.1f} ms, torch {row['torch ms']:.1f} ms, "
                  f"rel err {err:.1e}", file=sys.stderr, flush=True)
        del fns
    print(f"\n{environment_line()}; best of {args.repeat}" + ("; --quick shapes" if args.quick else ""))
    print()
    print_table(rows, ["case", "pass", "rel err", "minisd ms", "torch ms", "minisd MiB", "torch MiB"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

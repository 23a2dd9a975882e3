"""GPU benchmark of minisd's CUDA kernels against PyTorch (and a plain-CuPy baseline), on Stable Diffusion shapes.

    python benchmarks/gpu.py                    # production kernels, SD 1.5 shapes at 512x512, batch 2
    python benchmarks/gpu.py --all-versions     # every kernel version (v1 naive ... production)
    python benchmarks/gpu.py --only softmax
    python benchmarks/gpu.py --smoke            # no GPU: tiny shapes through the CPU emulator, checks the script

For each op and shape: validate first (minisd's output against a float32 reference computed with plain CuPy
array math, rel_error printed; a failing case is reported, not timed), then time forward and backward.
GPU times come from CUDA events: cupyx.profiler.benchmark for minisd and the CuPy baseline, torch.cuda.Event for
PyTorch (when torch has CUDA; the project's CPU-only torch wheel gives "-" in the torch columns). Times are the
median of 30 runs after 5 warm-ups; GB/s counts the bytes each op must move at least (inputs read once, outputs
written once), so it can be compared with the card's bandwidth (H100 SXM: ~3.3 TB/s). Ratios are minisd / torch.

Sections (one function per op family, each a list of SD shapes): groupnorm (ResBlock norms incl. the fused
SiLU), layernorm (transformer pre-norms, CLIP), softmax (attention rows: self 4096 and cross 77 keys), geglu
(FeedForward), conv (the U-Net's 3x3 convs at 320@64x64, 640@32x32, 1280@16x16, 1280@8x8, a stride-2 Downsample
and a 1x1 skip; vs cuDNN F.conv2d), attention (self 4096 tokens 8x40, cross 4096x77, 8x80, 8x160, CLIP's causal
77 tokens 12x64; vs F.scaled_dot_product_attention), unet (one SD 1.5 sampling step and one training step at
512x512, batch 2, vs diffusers' UNet2DConditionModel with the same random weights). Shapes from
docs/sd-reference.md: UNet channels 320/640/1280 at 64/32/16 latents, 8 heads.
conv/attention/unet report TFLOP/s (the FLOPs the op must do: 2 per multiply-add; attention backward counted as
2.5x forward, FlashAttention-2's convention) and "% of torch" = torch ms / minisd ms. torch runs with TF32 off
(minisd's kernels are strict fp32); "torch tf32 ms" is cuDNN with its default TF32 tensor-core convolutions.
--out FILE writes the device line and the table to FILE (scripts/gpu_check.sh: gpu_check_out/bench.md).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
import numpy as np  # noqa: E402

from minisd.cuda import ops  # noqa: E402
from minisd.testing import rel_error  # noqa: E402

# (name, args) per op. N = 2: a classifier-free-guidance batch at 512x512 (64x64 latents).
GROUPNORM = [((2, 320, 64, 64), 32), ((2, 640, 32, 32), 32), ((2, 1280, 16, 16), 32), ((1, 128, 256, 256), 32)]
LAYERNORM = [(2 * 4096, 320), (2 * 1024, 640), (2 * 256, 1280), (1 * 77, 768)]
SOFTMAX = [(2 * 8 * 4096, 4096), (2 * 8 * 4096, 77), (2 * 8 * 1024, 1024), (2 * 8 * 256, 256)]
GEGLU = [(2 * 4096, 1280), (2 * 1024, 2560), (2 * 256, 5120)]
SMOKE = {"groupnorm": [((3, 6, 7, 5), 3)], "layernorm": [(15, 33)], "softmax": [(21, 33)], "geglu": [(15, 37)],
         "conv": [((2, 5, 7, 9), 6, 3, 1), ((1, 3, 8, 8), 4, 3, 2)], "attention": [(2, 37, 21, 2, 40, False)],
         "unet": [("TINY", 2, 8, 8, 5)]}


class Env:
    """Where the benchmark runs: cupy on a GPU, or the emulator on NumPy (--smoke)."""

    def __init__(self, smoke):
        self.smoke = smoke
        self.torch = None
        if smoke:
            import minisd.cuda
            self.xp = np
            self._emulation = minisd.cuda.emulate()
            self._emulation.__enter__()
            return
        import minisd.cuda
        self.xp = minisd.cuda.require_gpu()  # a UserError naming what to install if there is no GPU
        try:
            import torch
            if torch.cuda.is_available():
                self.torch = torch
        except ImportError:
            pass

    def put(self, a):
        return self.xp.asarray(a)

    def time_ms(self, fn):
        """Median GPU time of fn() in ms (CUDA events); wall time of one run in --smoke."""
        if self.smoke:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        from cupyx.profiler import benchmark
        return 1e3 * float(np.median(benchmark(fn, n_repeat=30, n_warmup=5).gpu_times[0]))

    def time_torch_ms(self, fn):
        if self.torch is None:
            return None
        torch = self.torch
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times))

    def tt(self, a, grad=False):
        """A torch CUDA tensor sharing a CuPy array's memory (DLPack), optionally requiring grad."""
        t = self.torch.from_dlpack(a)
        return t.detach().requires_grad_(grad)


def _row(env, op, shape, version, direction, fn, ref_fn, torch_fn, nbytes, err, flops=None, torch_tf32_fn=None):
    """Validate-then-time one case. ref_fn: the plain-CuPy baseline (None: none). flops: the FLOPs the op must do
    (fills TFLOP/s). torch_tf32_fn: torch's fn again with TF32 tensor cores allowed (its default for convs)."""
    row = {"op": f"{op} {direction}", "shape": "x".join(map(str, shape)), "v": version, "rel err": err}
    if not err <= 1e-4:  # also catches NaN
        row["note"] = "FAILED validation"
        return row
    row["minisd ms"] = env.time_ms(fn)
    if ref_fn is not None:
        row["cupy ms"] = env.time_ms(ref_fn)
    t = env.time_torch_ms(torch_fn) if torch_fn is not None else None
    if t is not None:
        row["torch ms"] = t
        row["% of torch"] = 100.0 * t / row["minisd ms"]  # minisd's throughput as a share of torch's
    if torch_tf32_fn is not None and env.torch is not None:
        with _tf32(env.torch, True):
            row["torch tf32 ms"] = env.time_torch_ms(torch_tf32_fn)
    if nbytes:
        row["GB/s"] = nbytes / row["minisd ms"] / 1e6
    if flops:
        row["TFLOP/s"] = flops / row["minisd ms"] / 1e9
    return row


def bench_groupnorm(env, versions, cases):
    xp, rows = env.xp, []
    for shape, G in cases:
        rng = np.random.default_rng(0)
        x = env.put(rng.standard_normal(shape, dtype=np.float32))
        C = shape[1]
        g, b = env.put(rng.standard_normal(C, dtype=np.float32)), env.put(rng.standard_normal(C, dtype=np.float32))
        dy = env.put(rng.standard_normal(shape, dtype=np.float32))
        pshape = (1, C) + (1,) * (len(shape) - 2)

        def ref():  # plain CuPy array math, float32: the baseline and the validation reference
            xg = x.reshape(shape[0], G, -1)
            mu = xg.mean(-1, keepdims=True)
            v = ((xg - mu) / xp.sqrt(xg.var(-1, keepdims=True) + 1e-5)).reshape(shape) * g.reshape(pshape)
            v = v + b.reshape(pshape)
            return v / (1 + xp.exp(-v))

        want = ref()
        torch_fwd = torch_bwd = None
        if env.torch is not None:
            F = env.torch.nn.functional
            tx, tg, tb = env.tt(x, True), env.tt(g, True), env.tt(b, True)
            ty = F.silu(F.group_norm(tx, G, tg, tb, 1e-5))
            tdy = env.tt(dy)
            torch_fwd = lambda: F.silu(F.group_norm(tx, G, tg, tb, 1e-5))  # noqa: E731
            torch_bwd = lambda: env.torch.autograd.grad(ty, (tx, tg, tb), tdy, retain_graph=True)  # noqa: E731
        for v in versions["group_norm_forward"]:
            y, cache = ops.group_norm_forward(x, g, b, G, 1e-5, "silu", version=v)
            err = rel_error(_host(y), _host(want))
            rows.append(_row(env, "groupnorm+silu", shape, v, "fwd",
                             lambda: ops.group_norm_forward(x, g, b, G, 1e-5, "silu", version=v), ref, torch_fwd,
                             2 * x.nbytes, err))
            dx, _, _ = ops.group_norm_backward(dy, cache, version=v)
            err = 0.0 if np.isfinite(_host(dx)).all() else np.inf  # values: tests/test_cuda_kernels.py
            rows.append(_row(env, "groupnorm+silu", shape, v, "bwd", lambda: ops.group_norm_backward(dy, cache, version=v),
                             ref, torch_bwd, 3 * x.nbytes, err))
    return rows


def bench_layernorm(env, versions, cases):
    xp, rows = env.xp, []
    for M, D in cases:
        rng = np.random.default_rng(0)
        x = env.put(rng.standard_normal((M, D), dtype=np.float32))
        g, b = env.put(rng.standard_normal(D, dtype=np.float32)), env.put(rng.standard_normal(D, dtype=np.float32))
        dy = env.put(rng.standard_normal((M, D), dtype=np.float32))

        def ref():
            mu = x.mean(-1, keepdims=True)
            return (x - mu) / xp.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b

        want = ref()
        torch_fwd = torch_bwd = None
        if env.torch is not None:
            F = env.torch.nn.functional
            tx, tg, tb = env.tt(x, True), env.tt(g, True), env.tt(b, True)
            ty, tdy = F.layer_norm(tx, (D,), tg, tb, 1e-5), env.tt(dy)
            torch_fwd = lambda: F.layer_norm(tx, (D,), tg, tb, 1e-5)  # noqa: E731
            torch_bwd = lambda: env.torch.autograd.grad(ty, (tx, tg, tb), tdy, retain_graph=True)  # noqa: E731
        for v in versions["layer_norm_forward"]:
            y, cache = ops.layer_norm_forward(x, g, b, 1e-5, version=v)
            rows.append(_row(env, "layernorm", (M, D), v, "fwd", lambda: ops.layer_norm_forward(x, g, b, 1e-5, version=v),
                             ref, torch_fwd, 2 * x.nbytes, rel_error(_host(y), _host(want))))
            dx, _, _ = ops.layer_norm_backward(dy, cache, version=v)
            err = 0.0 if np.isfinite(_host(dx)).all() else np.inf
            rows.append(_row(env, "layernorm", (M, D), v, "bwd", lambda: ops.layer_norm_backward(dy, cache, version=v),
                             ref, torch_bwd, 3 * x.nbytes, err))
    return rows


def bench_softmax(env, versions, cases):
    xp, rows = env.xp, []
    for M, S in cases:
        rng = np.random.default_rng(0)
        x = env.put(3 * rng.standard_normal((M, S), dtype=np.float32))
        dy = env.put(rng.standard_normal((M, S), dtype=np.float32))

        def ref():
            e = xp.exp(x - x.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        want = ref()
        torch_fwd = torch_bwd = None
        if env.torch is not None:
            tx = env.tt(x, True)
            ty, tdy = env.torch.softmax(tx, -1), env.tt(dy)
            torch_fwd = lambda: env.torch.softmax(tx, -1)  # noqa: E731
            torch_bwd = lambda: env.torch.autograd.grad(ty, (tx,), tdy, retain_graph=True)  # noqa: E731
        for v in versions["softmax_forward"]:
            y, _ = ops.softmax_forward(x, version=v)
            rows.append(_row(env, "softmax", (M, S), v, "fwd", lambda: ops.softmax_forward(x, version=v), ref,
                             torch_fwd, 2 * x.nbytes, rel_error(_host(y), _host(want))))
        cache = ops._act.SoftmaxCache(want, 1)
        for v in versions["softmax_backward"]:
            dx = ops.softmax_backward(dy, cache, version=v)
            want_dx = want * (dy - (dy * want).sum(-1, keepdims=True))
            rows.append(_row(env, "softmax", (M, S), v, "bwd", lambda: ops.softmax_backward(dy, cache, version=v),
                             ref, torch_bwd, 3 * x.nbytes, rel_error(_host(dx), _host(want_dx))))
    return rows


def bench_geglu(env, versions, cases):
    xp, rows = env.xp, []
    for M, Fi in cases:
        rng = np.random.default_rng(0)
        h = env.put(rng.standard_normal((M, 2 * Fi), dtype=np.float32))
        dy = env.put(rng.standard_normal((M, Fi), dtype=np.float32))
        erf = _erf(xp)

        def ref():
            return h[:, :Fi] * (0.5 * h[:, Fi:] * (1 + erf(h[:, Fi:] * np.float32(0.7071067811865476))))

        want = ref()
        torch_fwd = torch_bwd = None
        if env.torch is not None:
            F = env.torch.nn.functional
            th = env.tt(h, True)
            ty, tdy = th[:, :Fi] * F.gelu(th[:, Fi:]), env.tt(dy)
            torch_fwd = lambda: th[:, :Fi] * F.gelu(th[:, Fi:])  # noqa: E731
            torch_bwd = lambda: env.torch.autograd.grad(ty, (th,), tdy, retain_graph=True)  # noqa: E731
        for v in versions["geglu_forward"]:
            y, cache = ops.geglu_forward(h, version=v)
            rows.append(_row(env, "geglu", (M, 2 * Fi), v, "fwd", lambda: ops.geglu_forward(h, version=v), ref,
                             torch_fwd, h.nbytes * 3 // 2, rel_error(_host(y), _host(want))))
            dh = ops.geglu_backward(dy, cache, version=v)
            err = 0.0 if np.isfinite(_host(dh)).all() else np.inf
            rows.append(_row(env, "geglu", (M, 2 * Fi), v, "bwd", lambda: ops.geglu_backward(dy, cache, version=v),
                             ref, torch_bwd, h.nbytes * 5 // 2, err))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# conv2d, attention, the whole U-Net (kernels/conv2d.cu, kernels/attention.cu)

class _tf32:
    """Context: TF32 tensor cores on/off for torch's cuDNN convs and cuBLAS matmuls. minisd's kernels are strict
    fp32, so the fair comparison is torch with TF32 off (the "torch ms" columns); TF32 on is torch's default for
    convolutions and is shown separately ("torch tf32 ms")."""

    def __init__(self, torch, on):
        self.torch, self.on = torch, on

    def __enter__(self):
        b = self.torch.backends
        self.old = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        b = self.torch.backends
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = self.old


def _cpu_torch():
    """CPU torch for validating --smoke runs (None if torch is not installed)."""
    try:
        import torch
        return torch
    except ImportError:
        return None


# (x shape (N, C, H, W), Cout, kernel, stride): the SD 1.5 U-Net's 3x3 convs at 512x512 (64x64 latents), batch 2
CONV = [((2, 320, 64, 64), 320, 3, 1), ((2, 640, 32, 32), 640, 3, 1), ((2, 1280, 16, 16), 1280, 3, 1),
        ((2, 1280, 8, 8), 1280, 3, 1), ((2, 320, 64, 64), 320, 3, 2), ((2, 640, 32, 32), 320, 1, 1)]


def bench_conv(env, versions, cases):
    """conv2d forward and backward against cuDNN (F.conv2d, TF32 off; TF32 on shown too)."""
    rows = []
    tc = env.torch or _cpu_torch()
    for shape, Cout, K, stride in cases:
        rng = np.random.default_rng(0)
        N, C, H, W = shape
        pad = K // 2
        x = env.put(rng.standard_normal(shape, dtype=np.float32))
        w = env.put((rng.standard_normal((Cout, C, K, K)) / np.sqrt(C * K * K)).astype(np.float32))
        b = env.put(rng.standard_normal(Cout, dtype=np.float32))
        Ho, Wo = (H + 2 * pad - K) // stride + 1, (W + 2 * pad - K) // stride + 1
        dy = env.put(rng.standard_normal((N, Cout, Ho, Wo), dtype=np.float32))
        flops = 2.0 * N * Cout * Ho * Wo * C * K * K
        torch_fwd = torch_bwd = None
        if env.torch is not None:  # on the GPU: the tensors share the CuPy arrays' memory
            F = env.torch.nn.functional
            tx, tw, tb, tdy = env.tt(x, True), env.tt(w, True), env.tt(b, True), env.tt(dy)
        else:  # --smoke: the reference runs on the CPU
            F = tc.nn.functional
            tx, tw, tb, tdy = (tc.tensor(_host(a), requires_grad=bool(g)) for a, g in ((x, 1), (w, 1), (b, 1), (dy, 0)))
        with _tf32(tc, False):
            ty = F.conv2d(tx, tw, tb, stride=stride, padding=pad)
            tgrads = tc.autograd.grad(ty, (tx, tw, tb), tdy, retain_graph=True)
        want = ty.detach().cpu().numpy()
        want_grads = [g.cpu().numpy() for g in tgrads]
        if env.torch is not None:
            torch_fwd = lambda: F.conv2d(tx, tw, tb, stride=stride, padding=pad)  # noqa: E731
            torch_bwd = lambda: env.torch.autograd.grad(ty, (tx, tw, tb), tdy, retain_graph=True)  # noqa: E731
        for v in versions["conv2d_forward"]:
            y, cache = ops.conv2d_forward(x, w, b, stride, pad, version=v)
            with _tf32(tc, False):
                rows.append(_row(env, f"conv{K}x{K}/{stride}", shape + (Cout,), v, "fwd",
                                 lambda: ops.conv2d_forward(x, w, b, stride, pad, version=v), None, torch_fwd,
                                 0, rel_error(_host(y), want), flops, torch_tf32_fn=torch_fwd))
        for v in versions["conv2d_backward"]:
            _, cache = ops.conv2d_forward(x, w, b, stride, pad, version=v)
            grads = ops.conv2d_backward(dy, cache, version=v)
            err = max(rel_error(_host(g), r) for g, r in zip(grads, want_grads))
            with _tf32(tc, False):
                rows.append(_row(env, f"conv{K}x{K}/{stride}", shape + (Cout,), v, "bwd",
                                 lambda: ops.conv2d_backward(dy, cache, version=v), None, torch_bwd, 0, err,
                                 2 * flops, torch_tf32_fn=torch_bwd))
    return rows


# (N, L, S, heads, head dim, causal): SD 1.5 self attention at 64x64 latents (4096 tokens, 8 x 40) and its cross
# attention (77 text tokens), the 32x32 / 16x16 levels (8 x 80, 8 x 160), CLIP-L's causal self attention (12 x 64)
ATTENTION = [(2, 4096, 4096, 8, 40, False), (2, 4096, 77, 8, 40, False), (2, 1024, 1024, 8, 80, False),
             (2, 256, 256, 8, 160, False), (2, 77, 77, 12, 64, True)]


def bench_attention(env, versions, cases):
    """Fused attention forward and backward against F.scaled_dot_product_attention (fp32, TF32 off)."""
    rows = []
    tc = env.torch or _cpu_torch()
    for N, L, S, h, d, causal in cases:
        rng = np.random.default_rng(0)
        D = h * d
        q, k, v = (env.put(rng.standard_normal((N, T, D), dtype=np.float32)) for T in (L, S, S))
        dy = env.put(rng.standard_normal((N, L, D), dtype=np.float32))
        if env.torch is not None:
            tq, tk, tv, tdy = env.tt(q, True), env.tt(k, True), env.tt(v, True), env.tt(dy)
        else:
            tq, tk, tv, tdy = (tc.tensor(_host(a), requires_grad=bool(g)) for a, g in ((q, 1), (k, 1), (v, 1), (dy, 0)))

        def heads(t, T):
            return t.view(N, T, h, d).transpose(1, 2)  # (N, h, T, d) view, as diffusers' attention processor

        def sdpa():
            return tc.nn.functional.scaled_dot_product_attention(heads(tq, L), heads(tk, S), heads(tv, S),
                                                                 is_causal=causal)

        with _tf32(tc, False):
            ty = sdpa()
            tgrads = tc.autograd.grad(ty, (tq, tk, tv), heads(tdy, L), retain_graph=True)
        want = ty.detach().transpose(1, 2).reshape(N, L, D).cpu().numpy()
        want_grads = [g.cpu().numpy() for g in tgrads]
        torch_fwd = torch_bwd = None
        if env.torch is not None:
            torch_fwd = sdpa
            torch_bwd = lambda: tc.autograd.grad(ty, (tq, tk, tv), heads(tdy, L), retain_graph=True)  # noqa: E731
        flops = 4.0 * N * h * L * S * d * (0.5 if causal else 1.0)  # q k^T and p v; causal: half the pairs
        label = "attention" + (" causal" if causal else "" if S == L else " cross")
        for ver in versions["attention_forward"]:
            y, cache = ops.attention_forward(q, k, v, h, causal, version=ver)
            with _tf32(tc, False):
                rows.append(_row(env, label, (N, L, S, f"{h}x{d}"), ver, "fwd",
                                 lambda: ops.attention_forward(q, k, v, h, causal, version=ver), None, torch_fwd,
                                 0, rel_error(_host(y), want), flops))
        for ver in versions["attention_backward"]:
            _, cache = ops.attention_forward(q, k, v, h, causal, version=ver)
            grads = ops.attention_backward(dy, cache, version=ver)
            err = max(rel_error(_host(g), r) for g, r in zip(grads, want_grads))
            with _tf32(tc, False):
                rows.append(_row(env, label, (N, L, S, f"{h}x{d}"), ver, "bwd",
                                 lambda: ops.attention_backward(dy, cache, version=ver), None, torch_bwd, 0, err,
                                 2.5 * flops))  # FlashAttention-2's accounting: backward = 2.5 x forward
    return rows


# (config name, batch, latent H, W, context tokens): one sampling step of SD 1.5 at 512x512 with classifier-free
# guidance (batch 2), and a training step (forward + backward) at the same size
UNET = [("SD15", 2, 64, 64, 77)]


def bench_unet(env, versions, cases):
    """The whole U-Net on the production kernels vs diffusers' UNet2DConditionModel (fp32, TF32 off), same
    random weights (copied through the converter's rename table), same inputs: a sampling step (forward) and a
    training step (forward + backward). Needs torch and diffusers (a GPU build of torch for the timings)."""
    tc = env.torch or _cpu_torch()
    try:
        import diffusers
    except ImportError:
        return [{"op": "unet", "note": "skipped: diffusers is not installed"}]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from refmodels import diffusers_unet_config, randomize_, state_numpy, unet_params_from_diffusers
    from minisd.models import unet as U
    rows = []
    for name, N, H, W, S in cases:
        cfg = U.PRESETS[name]
        tc.manual_seed(0)
        ref = randomize_(diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg, sample_size=H)), 0)
        params = unet_params_from_diffusers(state_numpy(ref, np.float32), cfg, np.float32)
        model = U.UNet(cfg, params=params.to(env.xp))
        dev = "cuda" if env.torch is not None else "cpu"
        ref = ref.to(dev).float()
        rng = np.random.default_rng(0)
        x = env.put(rng.standard_normal((N, cfg.in_channels, H, W), dtype=np.float32))
        ctx = env.put(rng.standard_normal((N, S, cfg.context_dim), dtype=np.float32))
        dout = env.put(rng.standard_normal((N, cfg.out_channels, H, W), dtype=np.float32))
        t = np.full(N, 999.0)  # timesteps are host values (the U-Net builds its embedding with NumPy)
        if env.torch is not None:
            tx, tctx, tdout = env.tt(x), env.tt(ctx), env.tt(dout)
        else:
            tx, tctx, tdout = (tc.tensor(_host(a)) for a in (x, ctx, dout))
        tt = tc.tensor(t, device=dev)

        def ours():
            return model.forward(x, t, ctx)[0]

        def theirs():
            with tc.no_grad():
                return ref(tx, tt, encoder_hidden_states=tctx).sample

        def ours_train():
            model.params.zero_grad()
            out, cache = model.forward(x, t, ctx, keep_cache=True)
            return model.backward(dout, cache)

        tx_g, tctx_g = tx.detach().requires_grad_(True), tctx.detach().requires_grad_(True)

        def theirs_train():
            ref.zero_grad(set_to_none=True)
            tx_g.grad = tctx_g.grad = None
            out = ref(tx_g, tt, encoder_hidden_states=tctx_g).sample
            out.backward(tdout)

        with _tf32(tc, False):
            err = rel_error(_host(ours()), theirs().cpu().numpy())
            dx, dctx = ours_train()
            theirs_train()
            err_train = max(rel_error(_host(dx), tx_g.grad.cpu().numpy()),
                            rel_error(_host(dctx), tctx_g.grad.cpu().numpy()))  # input gradients
            shape = (N, cfg.in_channels, H, W)
            rows.append(_row(env, f"unet {name}", shape, "prod", "step", ours, None,
                             theirs if env.torch is not None else None, 0, err))
            rows.append(_row(env, f"unet {name}", shape, "prod", "train", ours_train, None,
                             theirs_train if env.torch is not None else None, 0, err_train))
    return rows


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _erf(xp):
    if xp is np:
        from minisd.ops.activations import erf
        return erf
    import cupyx.scipy.special
    return cupyx.scipy.special.erf


SECTIONS = {"groupnorm": (bench_groupnorm, GROUPNORM), "layernorm": (bench_layernorm, LAYERNORM),
            "softmax": (bench_softmax, SOFTMAX), "geglu": (bench_geglu, GEGLU), "conv": (bench_conv, CONV),
            "attention": (bench_attention, ATTENTION), "unet": (bench_unet, UNET)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all-versions", action="store_true", help="time every kernel version, not just production")
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes in the CPU emulator (tests the script)")
    p.add_argument("--out", help="also write the device line and the table (markdown) to this file")
    args = p.parse_args(argv)
    from minisd.errors import UserError
    try:
        env = Env(args.smoke)
    except UserError as e:
        print(f"benchmarks/gpu.py needs a GPU: {e}\n(use --smoke to exercise the script in the CPU emulator)")
        return 2
    versions = {op: (avail if args.all_versions else (prod,)) for op, (avail, prod) in ops.VERSIONS.items()}
    rows = []
    for name in args.only or SECTIONS:
        fn, cases = SECTIONS[name]
        rows += fn(env, versions, SMOKE[name] if args.smoke else cases)
    if not args.smoke:
        import cupy
        dev = cupy.cuda.runtime.getDeviceProperties(0)
        head = (f"device: {dev['name'].decode()}, CuPy {cupy.__version__}, torch CUDA: "
                f"{env.torch.__version__ if env.torch else 'not available (torch columns empty)'}")
    else:
        head = "smoke run: CPU emulator, tiny shapes; the times are emulator times, not GPU times"
    print(head)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table
    # "% of torch": minisd's throughput as a share of torch's (torch ms / minisd ms); torch with TF32 off, as
    # minisd's kernels are strict fp32 ("torch tf32 ms": cuDNN's default TF32 tensor-core convs, for reference)
    table = print_table(rows, ["op", "shape", "v", "rel err", "minisd ms", "torch ms", "% of torch", "torch tf32 ms",
                               "cupy ms", "GB/s", "TFLOP/s", "note"])
    if args.out:
        Path(args.out).write_text(f"{head}\n\n{table}\n")
    failed = [r for r in rows if str(r.get("note", "")).startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("MINISD_CUDA_POISON", "0")
    sys.exit(main())

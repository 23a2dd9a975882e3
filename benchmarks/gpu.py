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
(FeedForward). Shapes from docs/sd-reference.md: UNet channels 320/640/1280 at 64/32/16 latents, 8 heads.
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
SMOKE = {"groupnorm": [((3, 6, 7, 5), 3)], "layernorm": [(15, 33)], "softmax": [(21, 33)], "geglu": [(15, 37)]}


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


def _row(env, op, shape, version, direction, fn, ref_fn, torch_fn, nbytes, err):
    row = {"op": f"{op} {direction}", "shape": "x".join(map(str, shape)), "v": version, "rel err": err}
    if err > 1e-4:
        row["note"] = "FAILED validation"
        return row
    row["minisd ms"] = env.time_ms(fn)
    row["cupy ms"] = env.time_ms(ref_fn)
    t = env.time_torch_ms(torch_fn) if torch_fn is not None else None
    if t is not None:
        row["torch ms"] = t
    row["GB/s"] = nbytes / row["minisd ms"] / 1e6
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


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _erf(xp):
    if xp is np:
        from minisd.ops.activations import erf
        return erf
    import cupyx.scipy.special
    return cupyx.scipy.special.erf


SECTIONS = {"groupnorm": (bench_groupnorm, GROUPNORM), "layernorm": (bench_layernorm, LAYERNORM),
            "softmax": (bench_softmax, SOFTMAX), "geglu": (bench_geglu, GEGLU)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all-versions", action="store_true", help="time every kernel version, not just production")
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes in the CPU emulator (tests the script)")
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
        print(f"device: {dev['name'].decode()}, CuPy {cupy.__version__}, torch CUDA: "
              f"{env.torch.__version__ if env.torch else 'not available (torch columns empty)'}")
    else:
        print("smoke run: CPU emulator, tiny shapes; the times are emulator times, not GPU times")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table
    print_table(rows, ["op", "shape", "v", "rel err", "minisd ms", "torch ms", "cupy ms", "GB/s", "note"])
    failed = [r for r in rows if r.get("note")]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("MINISD_CUDA_POISON", "0")
    sys.exit(main())

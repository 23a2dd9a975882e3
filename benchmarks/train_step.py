"""U-Net training step: minisd (NumPy, hand-written backward) vs the same model in PyTorch CPU (diffusers, autograd).

    python benchmarks/train_step.py                      # the U-Nets of the shipped recipes, batch 64
    BENCH_THREADS=1 python benchmarks/train_step.py      # one thread each (a loaded machine)
    python benchmarks/train_step.py --only mnist_ddpm --batch 32 --repeat 5

One step = forward with caches + L_simple (MSE against noise) + full backward (every parameter gradient) + an
AdamW update, for both libraries; same weights, same inputs, same thread count (benchmarks/common.py sets the BLAS
and minisd thread variables before numpy/torch are imported, and torch.set_num_threads). Both are timed
interleaved in one process (best of --repeat after a warm-up), so load from other processes hits both; the ratio
minisd / torch is what to read (> 1: minisd is slower).

The torch twin is diffusers' UNet2DConditionModel built from the minisd config (tests/refmodels.py) with minisd's
weights copied in (the parity tests in tests/test_model_unet.py check they compute the same function). minisd's
pixel U-Nets (context_dim None) let attn2 attend to the image itself; diffusers does the same when each block's
cross_attention_dim equals its width and encoder_hidden_states is None, which is how that twin is built here.
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import BENCH_THREADS, best_times, print_table  # noqa: E402  (sets thread variables first)

import numpy as np  # noqa: E402

from minisd.models.unet import UNet  # noqa: E402
from minisd.ops.loss import mse_loss_backward, mse_loss_forward  # noqa: E402
from minisd.optim import AdamW  # noqa: E402
from minisd.train.recipes import build_config, load_recipe  # noqa: E402

CASES = {  # recipe -> (input shape (C, H, W), context tokens or None)
    "mnist_ddpm": ((1, 28, 28), None),
    "mnist_ldm": ((4, 8, 8), 77),
    "cifar_ddpm": ((3, 32, 32), None),
}


def build(recipe_name, batch, seed=0):
    """minisd UNet + its diffusers twin with the same weights, and one batch of inputs."""
    import torch
    import diffusers
    from refmodels import diffusers_unet_config, state_numpy, unet_params_from_diffusers
    cfg = build_config("unet", load_recipe(recipe_name)["unet"])
    shape, S = CASES[recipe_name]
    kw = diffusers_unet_config(cfg, sample_size=shape[1])
    if cfg.context_dim is None:  # attn2 attends to the image: cross_attention_dim = each block's own width
        widths = [cfg.model_channels * m for m in cfg.channel_mult]
        kw["cross_attention_dim"] = tuple(widths)
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**kw)
    model = UNet(cfg, params=unet_params_from_diffusers(state_numpy(ref), cfg))
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch,) + shape).astype(np.float32)
    t = g.integers(0, 1000, batch)
    noise = g.standard_normal(x.shape).astype(np.float32)
    ctx = None if S is None else g.standard_normal((batch, S, cfg.context_dim)).astype(np.float32)
    y = None if cfg.num_classes is None else g.integers(0, cfg.num_classes, batch)
    return model, ref, (x, t, noise, ctx, y)


def minisd_step(model, inputs):
    x, t, noise, ctx, y = inputs
    opt = AdamW(model.params, lr=1e-4)

    def step():
        model.params.zero_grad()
        out, cache = model.forward(x, t, context=ctx, y=y, keep_cache=True)
        loss, c = mse_loss_forward(out, noise)
        model.backward(mse_loss_backward(1.0, c), cache)
        opt.step()
        return float(loss)
    return step


def torch_step(ref, inputs):
    import torch
    x, t, noise, ctx, y = (None if a is None else torch.tensor(a) for a in inputs)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, foreach=False)

    def step():
        opt.zero_grad(set_to_none=True)
        out = ref(x, t, ctx, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(out, noise)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(BENCH_THREADS)
    rows = []
    for name in args.only:
        model, ref, inputs = build(name, args.batch)
        a, b = minisd_step(model, inputs), torch_step(ref, inputs)
        la, lb = a(), b()  # same weights, same inputs: the first losses agree (a wrong twin would show here)
        times = best_times({"minisd": a, "torch": b}, repeat=args.repeat, warmup=1)
        rows.append({"recipe": name, "batch": args.batch, "params": model.num_parameters(),
                     "loss rel diff": f"{abs(la - lb) / abs(lb):.1e}",
                     "minisd ms": 1e3 * times["minisd"], "torch ms": 1e3 * times["torch"]})
        print(f"{name}: minisd {times['minisd']:.3f} s, torch {times['torch']:.3f} s", flush=True)
    print(f"\nthreads: {BENCH_THREADS} (BLAS, minisd pool, torch.set_num_threads); best of {args.repeat}")
    print_table(rows, ["recipe", "batch", "params", "loss rel diff", "minisd ms", "torch ms"])


if __name__ == "__main__":
    main()

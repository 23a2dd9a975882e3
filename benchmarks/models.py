"""Whole models: minisd (NumPy) vs diffusers/transformers on PyTorch CPU, same weights, float32.

    python benchmarks/models.py                          # every case, timing and peak memory
    python benchmarks/models.py --only unet --repeat 2   # cases whose name contains "unet"
    python benchmarks/models.py --no-memory              # timing only (skips the isolated peak-memory runs)
    python benchmarks/models.py --quick                  # tiny configs: a smoke test of the script (seconds)
    BENCH_THREADS=8 python benchmarks/models.py          # both libraries get the same thread count (default 2)

Cases (inference forwards run without caches in minisd and under torch.no_grad() in torch):
  * unet sd15 64x64 b1 / b2: the SD 1.5 U-Net (minisd/models/unet.py SD15 vs diffusers UNet2DConditionModel),
    latent (N, 4, 64, 64) (a 512x512 image), t = 421, context (N, 77, 768). b2 is the classifier-free-guidance
    batch of one image.
  * vae decode 64x64 -> 512x512: AutoencoderKL's decoder (post_quant_conv included) on z (1, 4, 64, 64).
  * clip text sd15 77 tokens: the SD 1.5 text encoder (CLIP-L, 12 layers, causal) on (1, 77) token ids, last
    hidden state after the final LayerNorm; transformers' CLIPTextModel with its default SDPA attention.
  * unet train step: the U-Net of the mnist_ldm recipe at batch 64, one step = forward with caches + L_simple
    + full backward + AdamW (benchmarks/train_step.py's step functions).
With --quick every case uses the TINY preset of its model (8x8 latents, 12-wide CLIP) instead.

The torch twins are built by diffusers/transformers from the configs tests/refmodels.py derives, randomised as
the parity tests do (refmodels.randomize_: std 1/sqrt(fan_in), norms 1 + 0.1 N, so activations stay O(1)), and
their weights are copied into minisd through weights_convert/names.py. "rel diff" is max|minisd - torch| /
max|torch| of the outputs (the first losses for the training step): a wrong twin shows there. Times are the best
of --repeat, minisd and torch interleaved in one process (common.best_times), after the untimed call that gave
"rel diff"; ratios are minisd / torch (> 1: minisd is slower or uses more).

Memory is measured per case and library in a fresh process holding only that library (common.run_isolated),
for one call of the timed function. There each library initialises its own random weights (values do not change
what an op allocates) and the peak is restarted once weights and inputs exist, so initialisation temporaries
(float64 draws, freed heap blocks: see _release_free_heap) are not counted:
  * "MiB": peak RSS during the call minus the RSS after the imports = weights + inputs + working memory. This is
    the number the issue's "peak RSS of the U-Net forward <= 1.1x torch's" compares.
  * "work MiB": peak RSS during the call minus the RSS before it = what the forward itself allocates on top of
    the resident weights and inputs (activations, caches, workspaces).
"""
import argparse
import gc
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
import common  # noqa: E402  (sets OMP/BLAS thread counts before numpy/torch load)
from common import BENCH_THREADS, best_times, print_table, run_isolated  # noqa: E402

import numpy as np  # noqa: E402

from minisd.models import clip as C  # noqa: E402
from minisd.models import unet as U  # noqa: E402
from minisd.models import vae as V  # noqa: E402
from minisd.train.recipes import build_config, load_recipe  # noqa: E402

TIMESTEP = 421.0
TORCH_IMPORTS = {  # imported before the baseline in the torch child, so module code is not charged to a case
    "unet": ("numpy", "torch", "diffusers.models.unets.unet_2d_condition"),
    "train": ("numpy", "torch", "diffusers.models.unets.unet_2d_condition"),
    "vae": ("numpy", "torch", "diffusers.models.autoencoders.autoencoder_kl"),
    "clip": ("numpy", "torch", "transformers.models.clip.modeling_clip"),
}


def cases(quick=False):
    """[(name, kind, spec)]; spec is JSON (it travels to run_isolated's child): the config preset (or recipe)
    and the input sizes."""
    if quick:
        return [("unet tiny 8x8 b1", "unet", dict(cfg="TINY", N=1, H=8, S=77)),
                ("unet tiny 8x8 b2", "unet", dict(cfg="TINY", N=2, H=8, S=77)),
                ("vae decode tiny 8x8 -> 16x16", "vae", dict(cfg="TINY", N=1, H=8)),
                ("clip text tiny 77 tokens", "clip", dict(cfg="TINY", N=1, L=77)),
                ("unet train step tiny 8x8 b4", "train", dict(cfg="TINY", N=4, H=8, S=77))]
    return [("unet sd15 64x64 b1", "unet", dict(cfg="SD15", N=1, H=64, S=77)),
            ("unet sd15 64x64 b2", "unet", dict(cfg="SD15", N=2, H=64, S=77)),
            ("vae decode 64x64 -> 512x512", "vae", dict(cfg="SD", N=1, H=64)),
            ("clip text sd15 77 tokens", "clip", dict(cfg="SD15", N=1, L=77)),
            ("unet train step mnist_ldm 8x8 b64", "train", dict(recipe="mnist_ldm", N=64, H=8, S=77))]


def config(kind, spec):
    if kind == "train" and "recipe" in spec:
        return build_config("unet", load_recipe(spec["recipe"])["unet"])
    return {"unet": U, "train": U, "vae": V, "clip": C}[kind].PRESETS[spec["cfg"]]


def make_inputs(kind, spec, cfg, seed=0):
    """NumPy inputs of one case (the same for both libraries)."""
    g = np.random.default_rng(seed)
    N = spec["N"]
    if kind == "unet":
        H = spec["H"]
        return (g.standard_normal((N, cfg.in_channels, H, H), dtype=np.float32), np.full(N, TIMESTEP),
                g.standard_normal((N, spec["S"], cfg.context_dim), dtype=np.float32))
    if kind == "vae":
        return g.standard_normal((N, cfg.embed_dim, spec["H"], spec["H"]), dtype=np.float32)
    if kind == "clip":  # <|startoftext|>, 20 prompt tokens, <|endoftext|> padding to L, as SD1's tokenizer pads
        ids = np.full((N, spec["L"]), C.EOS_ID, dtype=np.int64)
        ids[:, 0] = 49406
        ids[:, 1:21] = g.integers(0, 49406, (N, 20))
        return ids
    # train: as benchmarks/train_step.py's build: x, t, noise, context, y
    H = spec["H"]
    x = g.standard_normal((N, cfg.in_channels, H, H)).astype(np.float32)
    t = g.integers(0, 1000, N)
    noise = g.standard_normal(x.shape).astype(np.float32)
    ctx = None if cfg.context_dim is None else g.standard_normal((N, spec["S"], cfg.context_dim)).astype(np.float32)
    return x, t, noise, ctx, None


# ----------------------------------------------------------------------------------------------------------------
# models: the torch reference alone, or the twin pair with the same weights

def torch_model(kind, cfg, spec, randomize=True, seed=0):
    """The diffusers/transformers model for a minisd config; randomize: refmodels.randomize_ (else the
    library's own default init, which is enough for memory and quicker)."""
    import torch
    from refmodels import diffusers_unet_config, diffusers_vae_config, randomize_, transformers_clip_config
    torch.manual_seed(seed)
    if kind in ("unet", "train"):
        from diffusers import UNet2DConditionModel
        ref = UNet2DConditionModel(**diffusers_unet_config(cfg, sample_size=spec["H"]))
    elif kind == "vae":
        from diffusers import AutoencoderKL
        ref = AutoencoderKL(**diffusers_vae_config(cfg))
    else:
        from transformers import CLIPTextModel
        hf = transformers_clip_config(cfg)
        hf._attn_implementation = "sdpa"  # transformers' default; refmodels pins "eager" for float64 tests
        ref = CLIPTextModel(hf)
    if randomize:
        randomize_(ref, seed)
    return ref.train() if kind == "train" else ref.eval()


def minisd_model(kind, cfg, params=None, seed=0):
    rng = np.random.default_rng(seed)
    if kind in ("unet", "train"):
        return U.UNet(cfg, params=params, rng=rng)
    if kind == "vae":
        return V.VAE(cfg, params=params, rng=rng)
    return C.CLIPTextModel(cfg, params=params, rng=rng)


def twins(kind, cfg, spec, seed=0):
    """(minisd model, torch model) with the same weights: torch builds and randomises, minisd copies."""
    from refmodels import (clip_params_from_transformers, state_numpy, unet_params_from_diffusers,
                           vae_params_from_diffusers)
    ref = torch_model(kind, cfg, spec, seed=seed)
    convert = {"unet": unet_params_from_diffusers, "train": unet_params_from_diffusers,
               "vae": vae_params_from_diffusers, "clip": clip_params_from_transformers}[kind]
    return minisd_model(kind, cfg, params=convert(state_numpy(ref), cfg)), ref


# ----------------------------------------------------------------------------------------------------------------
# the timed functions

def minisd_function(kind, model, inputs):
    if kind == "unet":
        x, t, ctx = inputs
        return lambda: model.forward(x, t, ctx)[0]
    if kind == "vae":
        return lambda: model.decode(inputs)[0]
    if kind == "clip":
        return lambda: model.forward(inputs)[0]
    from train_step import minisd_step
    return minisd_step(model, inputs)


def torch_function(kind, ref, inputs):
    import torch
    if kind == "train":
        from train_step import torch_step
        return torch_step(ref, inputs)
    if kind == "unet":
        x, t, ctx = (torch.from_numpy(a) for a in inputs)
    else:
        z = torch.from_numpy(inputs)

    def run():
        with torch.no_grad():
            if kind == "unet":
                return ref(x, t, encoder_hidden_states=ctx).sample
            if kind == "vae":
                return ref.decode(z).sample
            return ref(z).last_hidden_state
    return run


def isolated_case(lib, kind, spec, seed=0):
    """A run_isolated case: one library's model (its own random init) and inputs, then the function to measure.
    The peak is restarted after the setup: weights and inputs stay resident (counted), init temporaries not."""
    cfg = config(kind, spec)
    inputs = make_inputs(kind, spec, cfg, seed)
    if lib == "minisd":
        fn = minisd_function(kind, minisd_model(kind, cfg, seed=seed), inputs)
    else:
        fn = torch_function(kind, torch_model(kind, cfg, spec, randomize=False, seed=seed), inputs)
    gc.collect()
    _release_free_heap()
    common._reset_peak()  # VmHWM := current RSS (Linux); elsewhere the peak still includes the setup
    return fn


def _release_free_heap():
    """glibc keeps freed small blocks of the init (minisd's CLIP: ~50 MiB) in its heap, where they would count
    as resident weights; malloc_trim returns them to the OS. Done for both libraries; a no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------------------

def rel_diff(a, b):
    if isinstance(a, float):  # training step: the losses
        return abs(a - b) / abs(b)
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max() / np.abs(b).max())


def environment_line():
    import diffusers
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} logical CPUs; threads: {BENCH_THREADS} (BLAS, minisd pool, "
            f"torch.set_num_threads); numpy {np.__version__}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}; float32, random weights")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="SUBSTRING", help="run only cases whose name contains one of these")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats per library (the best is reported)")
    ap.add_argument("--no-memory", action="store_true", help="skip the isolated peak-memory runs")
    ap.add_argument("--quick", action="store_true", help="tiny configs (a smoke test of the script)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(BENCH_THREADS)
    todo = [c for c in cases(args.quick) if not args.only or any(s.lower() in c[0].lower() for s in args.only)]
    if not todo:
        ap.error(f"--only {args.only} matches none of: " + ", ".join(c[0] for c in cases(args.quick)))
    rows, pair, pair_key = [], None, None
    for name, kind, spec in todo:
        cfg = config(kind, spec)
        key = (kind, spec.get("cfg"), spec.get("recipe"))
        if key != pair_key:  # b1 and b2 share one pair; the previous pair is freed before the next is built
            pair = None
            gc.collect()
            print(f"building {kind} twins ({spec.get('cfg') or spec.get('recipe')})", file=sys.stderr, flush=True)
            pair, pair_key = twins(kind, cfg, spec), key
        model, ref = pair
        inputs = make_inputs(kind, spec, cfg)
        a, b = minisd_function(kind, model, inputs), torch_function(kind, ref, inputs)
        diff = rel_diff(a(), b())  # also the warm-up call of each
        t = best_times({"minisd": a, "torch": b}, repeat=args.repeat, warmup=0)
        rows.append({"case": name, "params M": model.params.num_parameters() / 1e6, "rel diff": diff,
                     "minisd s": t["minisd"], "torch s": t["torch"], "_kind": kind, "_spec": spec})
        print(f"{name}: minisd {t['minisd']:.3f} s, torch {t['torch']:.3f} s, rel diff {diff:.1e}",
              file=sys.stderr, flush=True)
        del a, b, inputs
    pair = model = ref = None
    gc.collect()
    if not args.no_memory:  # after the timing, so this process holds no model while a child measures
        for row in rows:
            for lib, imports in (("minisd", ("numpy",)), ("torch", TORCH_IMPORTS[row["_kind"]])):
                warmup = 1 if row["_kind"] == "train" else 0  # a step after the first holds AdamW's moments
                r = run_isolated(isolated_case, repeat=1, warmup=warmup, imports=imports, lib=lib,
                                 kind=row["_kind"], spec=row["_spec"])
                row[f"{lib} MiB"] = r.net_mib
                row[f"{lib} work MiB"] = r.peak_mib - r.setup_mib
            print(f"{row['case']}: peak minisd {row['minisd MiB']:.0f} MiB, torch {row['torch MiB']:.0f} MiB",
                  file=sys.stderr, flush=True)
    print(f"\n{environment_line()}; best of {args.repeat}" + ("; --quick configs" if args.quick else ""))
    print()
    print_table(rows, ["case", "params M", "rel diff", "minisd s", "torch s", "minisd MiB", "torch MiB",
                       "minisd work MiB", "torch work MiB"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""txt2img speed and memory: minisd vs torch + diffusers on the full SD 1.5 architecture (random weights).

    python benchmarks/pipeline.py                     # time per step at 256 and 512, peak memory at 512
    python benchmarks/pipeline.py --sizes 256 --skip-memory --repeat 2
    BENCH_THREADS=8 python benchmarks/pipeline.py     # both libraries get the same thread count (default 2)

What is measured (benchmarks/common.py enforces the rules: same threads, interleaved best-of-N, isolated peaks):
  * time per denoising step at HxW with classifier-free guidance (guidance 7.5): one step = the U-Net on the
    batch [uncond, cond] (2, 4, H/8, W/8) + guidance + a DDIM update, timed interleaved in one process.
  * peak memory of *loading and running* txt2img at 512x512 with guidance, fp32, 2 DDIM steps + VAE decode, each
    library alone in a fresh process (`run_isolated`): peak RSS minus the RSS after importing the library. The
    number of steps does not change the peak (each step frees what the previous one allocated).
The checkpoint is a random-weight SD 1.5 made with diffusers (tests/fixtures/make_sd_fixtures.py), written once
to $MINISD_BENCH_DIR (default /tmp/minisd-bench): an LDM single file for minisd and a diffusers folder for
diffusers, the formats each library loads natively. Weights do not change the cost of any op.
"""
import argparse
import os
import sys
from pathlib import Path

import common  # noqa: F401  (sets OMP/BLAS thread counts before numpy/torch load)
from common import BENCH_THREADS, best_times, print_table, run_isolated

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_DIR = Path(os.environ.get("MINISD_BENCH_DIR", "/tmp/minisd-bench"))
PROMPT = "a photo of an astronaut riding a horse on mars"


def ensure_checkpoint():
    """Write the random SD 1.5 once: BENCH_DIR/sd15.safetensors (LDM layout) and BENCH_DIR/sd15-diffusers/."""
    single, folder = BENCH_DIR / "sd15.safetensors", BENCH_DIR / "sd15-diffusers"
    if single.is_file() and (folder / "model_index.json").is_file():
        return single, folder
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    import make_sd_fixtures as fx
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    print(f"writing a random-weight SD 1.5 to {BENCH_DIR} (once)", file=sys.stderr)
    comps = fx.components("sd1", "full")
    fx.save_safetensors(fx.to_ldm_state_dict(comps), single)
    fx.save_diffusers(comps, folder)
    return single, folder


# ----------------------------------------------------------------------------------------------------------------
# cases for run_isolated (module level, so the child process can import them)

def minisd_txt2img(path, size=512, steps=2):
    """Load the checkpoint and run txt2img: everything inside the measured function."""
    import numpy as np

    from minisd.pipeline import txt2img
    from weights_convert.load import load_model

    def run():
        model = load_model(path)
        r = txt2img(model, PROMPT, steps=steps, sampler="ddim", guidance=7.5, height=size, width=size, seed=0,
                    progress=False)
        return np.asarray(r.images[0])
    return run


def diffusers_txt2img(folder, size=512, steps=2):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def run():
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                        generator=torch.Generator().manual_seed(0)).images[0]
    return run


# ----------------------------------------------------------------------------------------------------------------
# per-step timing (both libraries in this process, interleaved)

def step_functions(single, folder, size):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from minisd.diffusion import make_sampler
    from minisd.pipeline import guide
    from weights_convert.load import load_model

    model = load_model(single)
    rng = np.random.default_rng(0)
    h = size // 8
    x = rng.standard_normal((1, 4, h, h), dtype=np.float32)
    ids = model.tokenizer(["", PROMPT])
    ctx, _ = model.text_encoder.forward(ids)  # (2, 77, 768)
    smp = make_sampler("ddim", model.scheduler)
    smp.set_timesteps(50)
    t = int(smp.timesteps[0])

    def minisd_step():
        out, _ = model.unet.forward(np.concatenate([x, x]), t, ctx)
        return smp.step(guide(out, 7.5, 0.0), t, x)

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32,
                                                local_files_only=True).eval()
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(50)
    tx, tctx, tt = torch.from_numpy(x), torch.from_numpy(ctx), sched.timesteps[0]

    def torch_step():
        with torch.no_grad():
            out = unet(torch.cat([tx, tx]), tt, encoder_hidden_states=tctx).sample
            u, c = out.chunk(2)
            return sched.step(u + 7.5 * (c - u), tt, tx).prev_sample
    return {"minisd": minisd_step, "torch": torch_step}


def main(argv=None):
    ap = argparse.ArgumentParser(description="minisd vs diffusers txt2img: time per step and peak memory")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides for the per-step timing")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats per library (best is reported)")
    ap.add_argument("--memory-size", type=int, default=512, help="image side of the peak-memory run")
    ap.add_argument("--memory-steps", type=int, default=2, help="DDIM steps in the peak-memory run")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    single, folder = ensure_checkpoint()
    print(f"threads: {BENCH_THREADS}; SD 1.5 architecture, random fp32 weights, CFG batch 2, DDIM")
    rows = []
    if not args.skip_timing:
        for size in args.sizes:
            fns = step_functions(single, folder, size)
            t = best_times(fns, repeat=args.repeat, warmup=1)
            rows.append({"case": f"one step {size}x{size}", "minisd s": t["minisd"], "torch s": t["torch"]})
            del fns
    if not args.skip_memory:
        kw = dict(size=args.memory_size, steps=args.memory_steps)
        m = run_isolated(minisd_txt2img, repeat=1, warmup=0, imports=("numpy", "minisd.pipeline",
                                                                       "weights_convert.load"), path=str(single), **kw)
        d = run_isolated(diffusers_txt2img, repeat=1, warmup=0, imports=("numpy", "torch", "diffusers"),
                         folder=str(folder), **kw)
        rows.append({"case": f"load + txt2img {args.memory_size}x{args.memory_size}, {args.memory_steps} steps",
                     "minisd s": m.time_s, "torch s": d.time_s, "minisd MiB": m.net_mib, "torch MiB": d.net_mib})
    print_table(rows, ["case", "minisd s", "torch s", "minisd MiB", "torch MiB"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

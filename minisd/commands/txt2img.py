"""`minisd txt2img --prompt TEXT`: generate images from a text prompt and write PNGs with their parameters.

    minisd txt2img --prompt "a photo of a cat" --ckpt v1-5-pruned-emaonly.safetensors --steps 20 --seed 1
    minisd txt2img --prompt "a 7" --num-images 4 --out sevens.png        # sevens-0..3.png + sevens-grid.png
    minisd txt2img --prompt "a cat" --ckpt sd15/ --latents noise.npy      # reproduce a diffusers run exactly

--ckpt takes an original single-file checkpoint (.ckpt / .safetensors), a diffusers folder, or a model written by
`minisd convert`; without it the small default model shipped in the package is used. Each PNG carries the
generation parameters (tEXt "parameters" in the A1111 format, and "minisd" as JSON). Existing files are never
overwritten without --overwrite, and files are written atomically.

The shared options (model, sampling, output) are defined here and reused by `minisd img2img`.
"""
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "default_model.safetensors"
SAMPLER_CHOICES = ("ddpm", "ddim", "pndm", "euler", "euler_a", "lms", "dpmpp_2m")


def add_common_options(parser, default_out):
    """Options shared by txt2img and img2img."""
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="what the image should show")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="what it should not show (the unconditional branch of classifier-free guidance; "
                             "default: the empty prompt)")
    parser.add_argument("--ckpt", default=None, metavar="PATH",
                        help="model: an original .ckpt/.safetensors single file, a diffusers folder, or a file "
                             "written by `minisd convert` (default: the small model shipped with minisd)")
    parser.add_argument("--steps", type=int, default=50, metavar="N",
                        help="number of sampler steps (default 50; 20-30 is usually enough with dpmpp_2m)")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                        help="sampling method (default: the scheduler the checkpoint names, e.g. pndm for SD 1.5, "
                             "ddim for SD 2.1); its settings (betas, timestep spacing, prediction type) always come "
                             "from the checkpoint's scheduler config")
    parser.add_argument("--karras", action="store_true",
                        help="Karras noise levels (euler, euler_a, lms, dpmpp_2m only), e.g. 'DPM++ 2M Karras'")
    parser.add_argument("--guidance", type=float, default=7.5, metavar="W",
                        help="classifier-free guidance scale (default 7.5; 1 or less turns guidance off and halves "
                             "the work)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="guidance rescale in [0, 1] (Lin et al. 2023; default 0 = off)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="random seed (default: a random one, recorded in the PNG so the image can be redone)")
    parser.add_argument("--height", type=int, default=None, metavar="H",
                        help="image height in pixels, a multiple of 64 for SD (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, metavar="W",
                        help="image width in pixels, a multiple of 64 for SD (default: the model's native size)")
    parser.add_argument("--num-images", type=int, default=1, metavar="N",
                        help="images to generate (one batch); with N > 1, --out x.png writes x-0.png ... "
                             "x-{N-1}.png and the grid x-grid.png")
    parser.add_argument("--out", default=default_out, metavar="FILE.png",
                        help=f"output PNG (default {default_out})")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (NumPy, default) or cuda (CuPy on an NVIDIA GPU)")
    parser.add_argument("--vae-tile", type=int, default=None, metavar="T",
                        help="decode the image in tiles of T latent pixels (e.g. 64) to bound memory for large "
                             "images; the seams are blended, so results differ slightly from a full decode")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages")


def output_paths(out, n):
    """--out x.png -> [x.png] for one image, [x-0.png, ..., x-{n-1}.png] + x-grid.png for n > 1."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    if n == 1:
        return [out], None
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)], out.with_name(f"{out.stem}-grid.png")


def check_common(args):
    """Cheap checks before the model is loaded (so a typo does not cost a minute of loading)."""
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UserError(f"--{name} must be a positive multiple of 8 (64 for SD models), got {v}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UserError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.karras and args.sampler in ("ddpm", "ddim", "pndm"):
        raise UserError(f"--karras works with euler, euler_a, lms and dpmpp_2m, not {args.sampler}")


def load(args):
    """The model named by --ckpt (or the shipped default), on --device."""
    from weights_convert.load import load_model

    from ..pipeline import use_device
    if args.ckpt is None:
        if not DEFAULT_MODEL.is_file():
            raise UserError(f"no default model is installed ({DEFAULT_MODEL} is missing); pass --ckpt PATH with a "
                            f"Stable Diffusion checkpoint (.ckpt/.safetensors, a diffusers folder, or a model "
                            f"written by `minisd convert`)")
        path = DEFAULT_MODEL
    else:
        path = Path(args.ckpt)
    log(args, f"loading {path}")
    return use_device(load_model(path), args.device)


def log(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr)


def write_images(args, result):
    """Write the PNGs (+ grid) with their parameters; returns the paths written."""
    from ..image import make_grid, save_png
    paths, grid = output_paths(args.out, len(result.images))
    written = []
    for i, (img, path) in enumerate(zip(result.images, paths)):
        params = dict(result.parameters)
        if len(paths) > 1:
            params["index"] = i
        written.append(save_png(img, path, params, overwrite=args.overwrite))
    if grid is not None:
        written.append(save_png(make_grid(result.images), grid, dict(result.parameters), overwrite=args.overwrite))
    for p in written:
        print(p)
    return written


def configure(parser):
    add_common_options(parser, "txt2img.png")
    parser.add_argument("--latents", default=None, metavar="FILE.npy",
                        help="initial latents as a NumPy .npy array of shape (N, 4, H/8, W/8), used as is (only "
                             "scaled by the sampler's initial noise sigma, as diffusers does); fixes N, H and W")


def run(args):
    from ..image import check_writable
    from ..pipeline import txt2img
    check_common(args)
    latents = None
    if args.latents is not None:
        latents = read_latents(args.latents)
        if latents.shape[0] != args.num_images:
            raise UserError(f"--latents holds {latents.shape[0]} latents but --num-images is {args.num_images}; "
                            f"pass --num-images {latents.shape[0]}")
    paths, grid = output_paths(args.out, args.num_images)
    check_writable(paths + ([grid] if grid else []), args.overwrite)
    model = load(args)
    result = txt2img(model, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                     sampler=args.sampler, karras=args.karras, guidance=args.guidance,
                     guidance_rescale=args.guidance_rescale, height=args.height, width=args.width,
                     num_images=args.num_images, seed=args.seed, latents=latents, progress=not args.quiet,
                     vae_tile=args.vae_tile)
    write_images(args, result)
    return 0


def read_latents(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--latents file not found: {path}")
    try:
        a = np.load(path, allow_pickle=False)  # never unpickle: an .npy with objects could run code
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"--latents {path}: not a NumPy .npy array ({e})") from None
    if not isinstance(a, np.ndarray) or a.ndim != 4 or a.dtype.kind != "f":
        raise UserError(f"--latents {path}: need a float array of shape (N, 4, H/8, W/8), got "
                        f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    return a.astype(np.float32)

"""`minisd verify --ckpt PATH`: compare minisd with diffusers block by block on a checkpoint.

    minisd verify --ckpt v1-5-pruned-emaonly.safetensors --height 256 --width 256
    minisd verify --ckpt sd15-minisd.safetensors --reference ./stable-diffusion-v1-5/   # converted vs original

Runs the text encoder, U-Net (one CFG step), VAE decoder and encoder in minisd and, when torch + diffusers +
transformers are installed, in diffusers on the same inputs; prints every block's rel_error (max|a-b| / max|ref|)
and names the first block where the two diverge, then compares a short DDIM run end to end. Without torch it
runs minisd's side only (shapes, finiteness, timings). Exit status: 0 agree, 1 divergence, 2 user error.
"""
from ..verify import DEFAULT_TOL


def configure(parser):
    parser.add_argument("--ckpt", required=True, metavar="PATH",
                        help="the model to check: a .ckpt/.safetensors single file, a diffusers folder, or a minisd "
                             "file")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse", metavar="TEXT",
                        help="prompt fed to the text encoder (and the end-to-end run)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the test latents (default 0)")
    parser.add_argument("--height", type=int, default=None, metavar="H",
                        help="image height of the test (default: the model's native size; smaller is faster)")
    parser.add_argument("--width", type=int, default=None, metavar="W", help="image width of the test")
    parser.add_argument("--steps", type=int, default=2, metavar="N",
                        help="DDIM steps of the end-to-end comparison (default 2; 0 skips it)")
    parser.add_argument("--guidance", type=float, default=7.5, metavar="W", help="CFG scale of the end-to-end run")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOL, metavar="TOL",
                        help=f"rel_error above which a block counts as diverged (default {DEFAULT_TOL:g})")
    parser.add_argument("--reference", default=None, metavar="PATH",
                        help="build diffusers' side from this checkpoint instead of --ckpt (e.g. the diffusers "
                             "folder a minisd file was converted from)")
    parser.add_argument("--no-reference", action="store_true", help="run minisd's side only, even if torch is there")


def run(args):
    from ..errors import UserError
    from ..verify import verify
    if args.steps < 0:
        raise UserError(f"--steps must be >= 0, got {args.steps}")
    if (args.height is None) != (args.width is None):
        raise UserError("give both --height and --width, or neither")
    ok = verify(args.ckpt, prompt=args.prompt, seed=args.seed, height=args.height, width=args.width,
                steps=args.steps, guidance=args.guidance, tol=args.tolerance, reference=args.reference,
                use_reference=not args.no_reference)
    return 0 if ok else 1

"""`minisd img2img --init IMAGE --strength S --prompt TEXT`: transform an image guided by a prompt (SDEdit).

    minisd img2img --init sketch.png --strength 0.6 --prompt "an oil painting of a harbour" --ckpt sd15.safetensors

The image is encoded by the VAE, noised to the timestep `strength` of the way up the schedule, and denoised from
there with the prompt: strength 0 returns the image (through the VAE), 1 ignores it. Only int(steps * strength)
of the --steps are run, as in diffusers. The image is resized (Lanczos) to --width x --height when given, else
its own size is used and must be a multiple of 64 for SD. All other options are those of `minisd txt2img`.
"""
from ..errors import UserError
from .txt2img import add_common_options, check_common, load, output_paths, write_images


def configure(parser):
    add_common_options(parser, "img2img.png")
    parser.add_argument("--init", required=True, metavar="IMAGE", help="the starting image (PNG, JPEG, ...)")
    parser.add_argument("--strength", type=float, default=0.8, metavar="S",
                        help="how much to change the image, in [0, 1] (default 0.8): the fraction of the schedule "
                             "that is noised and denoised again")


def run(args):
    from ..image import check_writable, open_image
    from ..pipeline import img2img
    check_common(args)
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be in [0, 1], got {args.strength}")
    if (args.height is None) != (args.width is None):
        raise UserError("give both --height and --width, or neither (then the image's own size is used)")
    image = open_image(args.init)
    paths, grid = output_paths(args.out, args.num_images)
    check_writable(paths + ([grid] if grid else []), args.overwrite)
    model = load(args)
    result = img2img(model, args.prompt, image, strength=args.strength, negative_prompt=args.negative_prompt,
                     steps=args.steps, sampler=args.sampler, karras=args.karras, guidance=args.guidance,
                     guidance_rescale=args.guidance_rescale, height=args.height, width=args.width,
                     num_images=args.num_images, seed=args.seed, progress=not args.quiet, vae_tile=args.vae_tile)
    result.parameters["init"] = str(args.init)
    write_images(args, result)
    return 0

"""`minisd sample`: a grid of samples from a trained diffusion model (pixel DDPM or tiny text-to-image SD).

    minisd sample --ckpt runs/mnist_ddpm --class 3 7 --n 8 --out threes_and_sevens.png
    minisd sample --ckpt runs/mnist_ldm/model.safetensors --prompt "a handwritten seven" --guidance 4
    minisd sample --prompt "the number two"              # the shipped default model
    minisd sample --ckpt runs/cifar_ddpm --n 64 --sampler ddpm --steps 1000

--ckpt takes an exported model (RUN/model.safetensors), a training checkpoint (its EMA weights) or a run folder.
Each row of the grid is one class / prompt; --n images per row (unconditional models: --n images in total).
"""
import numpy as np

SAMPLERS = ("ddpm", "ddim", "pndm", "euler", "euler_a", "lms", "dpmpp_2m")


def configure(parser):
    parser.add_argument("--ckpt", default=None, metavar="PATH",
                        help="model file, checkpoint or run folder (default: the shipped tiny MNIST SD)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", metavar="K",
                        help="class indices to draw, one row each (pixel DDPM; default: every class)")
    parser.add_argument("--prompt", nargs="+", metavar="TEXT",
                        help="prompts, one row each (text-to-image models; default: 'a handwritten <digit>' x 10)")
    parser.add_argument("--n", type=int, default=8, help="samples per class / prompt (default 8)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the model's (ddim)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 50)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (1 = none; default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default="samples.png", metavar="PNG", help="output grid (default samples.png)")


def run(args):
    from ..errors import UserError
    from ..train.plots import image_grid, save_png
    from ..train.sampling import load_generator
    if args.n < 1:
        raise UserError("--n must be >= 1")
    gen = load_generator(args.ckpt)
    rng = np.random.default_rng(args.seed)
    kw = dict(guidance=args.guidance, sampler=args.sampler, steps=args.steps)
    if gen.conditioning == "text":
        if args.classes:
            prompts = [gen.prompt(k) for k in args.classes]
        else:
            prompts = args.prompt or [gen.prompt(k) for k in range(len(gen.class_names))]
        conds, labels, cols = [p for p in prompts for _ in range(args.n)], prompts, args.n
    elif gen.conditioning == "class":
        if args.prompt:
            raise UserError(f"{gen.source} is class-conditional: use --class K (0-{len(gen.class_names) - 1}), "
                            f"not --prompt")
        ks = args.classes if args.classes is not None else list(range(len(gen.class_names)))
        bad = [k for k in ks if not 0 <= k < len(gen.class_names)]
        if bad:
            raise UserError(f"--class {bad[0]} is out of range: this model has classes 0-{len(gen.class_names) - 1} "
                            f"({', '.join(gen.class_names)})")
        conds, labels, cols = np.repeat(np.asarray(ks), args.n), [gen.class_names[k] for k in ks], args.n
    else:
        if args.prompt or args.classes:
            raise UserError(f"{gen.source} is unconditional: drop --class / --prompt")
        conds, labels, cols = np.zeros(args.n, np.int64), None, min(args.n, 8)
    from tqdm import tqdm
    steps = args.steps or gen.defaults["steps"]
    with tqdm(total=steps, desc="sampling", unit="step") as bar:
        x = gen.sample(conds, rng, progress=bar, **kw)
    path = save_png(image_grid(x, cols, row_labels=labels), args.out)
    print(f"wrote {path} ({len(x)} images from {gen.source})")
    return 0

"""`minisd eval`: offline evaluation with a classifier trained by minisd (no Inception weights are needed).

    minisd eval                                          # the shipped default model (it carries its classifier)
    minisd eval --ckpt runs/mnist_ddpm --n-per-class 100 --json runs/mnist_ddpm/eval.json --grid eval.png
    minisd eval --ckpt runs/mnist_classifier             # classifier: test accuracy
    minisd eval --ckpt runs/mnist_clip                   # tiny CLIP: zero-shot test accuracy
    minisd eval --ckpt runs/mnist_vae                    # VAE: reconstruction PSNR (+ accuracy on reconstructions)

For generative models it reports the share of samples classified as the requested class, the Frechet distance
between the classifier's features of the samples and of the test set (NOT FID: see minisd/train/metrics.py), the
same distance for real training images (`fd_real`, the floor), and the CLIP score when a tiny CLIP is available.
"""
import json

import numpy as np


def configure(parser):
    parser.add_argument("--ckpt", default=None, metavar="PATH",
                        help="model file, checkpoint or run folder (default: the shipped tiny MNIST SD)")
    parser.add_argument("--classifier", default=None, metavar="FILE",
                        help="evaluation classifier (default: the one inside the model file, else "
                             "runs/<dataset>_classifier/model.safetensors)")
    parser.add_argument("--clip", default=None, metavar="FILE", help="tiny CLIP for CLIP scores (optional)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="dataset folder (default: $MINISD_DATA, else ~/.cache/minisd/data)")
    parser.add_argument("--n-per-class", type=int, default=100, help="samples per class (default 100)")
    parser.add_argument("--sampler", default=None, help="default: the model's (ddim)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--prompt-template", default=None, metavar="TEXT",
                        help="text models: the prompt per class, with {name} / {digit} (default "
                             "'a handwritten {name}')")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch", type=int, default=250, help="images generated per batch (default 250)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--grid", default=None, metavar="PNG", help="save the first 10 samples of each class")


def run(args):
    from ..errors import UserError
    from ..train.evaluate import evaluate_path
    if args.n_per_class < 2:
        raise UserError("--n-per-class must be >= 2")
    report, images = evaluate_path(args.ckpt, data_dir=args.data_dir, classifier_path=args.classifier,
                                   clip_path=args.clip, n_per_class=args.n_per_class, seed=args.seed,
                                   batch=args.batch, guidance=args.guidance, sampler=args.sampler, steps=args.steps,
                                   template=args.prompt_template)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.grid and images is not None:
        from ..train.plots import image_grid, save_png
        n = args.n_per_class
        K = len(images) // n
        pick = np.concatenate([images[k * n:k * n + min(n, 10)] for k in range(K)])
        save_png(image_grid(pick, min(n, 10)), args.grid)
        print(f"wrote {args.grid}")
    return 0

"""`minisd train --recipe NAME|FILE`: train a classifier, pixel DDPM, VAE, tiny CLIP or latent diffusion model.

    minisd train --list                                   # the named presets
    minisd train --recipe mnist_ddpm                      # -> runs/mnist_ddpm/ (log.jsonl, loss.png, samples/,
                                                          #    checkpoints/, model.safetensors, summary.json)
    minisd train --recipe mnist_ddpm --resume             # continue exactly where it stopped (Ctrl-C, kill, crash)
    minisd train --recipe my.json --out runs/try1 --set lr=5e-4 --set unet.model_channels=48
    minisd train --print-recipe mnist_ddpm > my.json      # start a recipe file from a preset

Data: --data-dir, else $MINISD_DATA, else ~/.cache/minisd/data (`minisd download mnist` fills it).
docs/training.md lists the recipes, the commands that made the shipped model and how long each run took.
"""
import json


def configure(parser):
    parser.add_argument("--recipe", metavar="NAME|FILE",
                        help="a preset name (see --list) or a JSON recipe file ({\"base\": \"mnist_ddpm\", ...})")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="dataset folder (default: $MINISD_DATA, else ~/.cache/minisd/data)")
    parser.add_argument("--out", default=None, metavar="RUN_DIR",
                        help="run folder for logs, samples, checkpoints and the model (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the run folder (optimizer, EMA, step, data "
                             "order and random state are restored)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (JSON value), e.g. --set steps=2000 --set unet.model_channels=48")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="with --resume: accept a recipe that differs from the checkpoint's (warns)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")
    parser.add_argument("--list", action="store_true", help="list the named presets and exit")
    parser.add_argument("--print-recipe", metavar="NAME", help="print a preset as JSON and exit")


def run(args):
    from ..errors import UserError
    from ..train.recipes import list_presets, load_recipe
    if args.list:
        for name, task, dataset in list_presets():
            print(f"{name:20s} {task:12s} {dataset}")
        return 0
    if args.print_recipe:
        print(json.dumps(load_recipe(args.print_recipe), indent=1))
        return 0
    if not args.recipe:
        raise UserError("pass --recipe NAME|FILE (minisd train --list shows the presets)")
    recipe = load_recipe(args.recipe, args.set)
    from ..train.trainer import train  # imported after the recipe is checked: errors come before any model code
    summary = train(recipe, out_dir=args.out, data_dir=args.data_dir, resume=args.resume,
                    progress=not args.no_progress, allow_changes=args.allow_recipe_change)
    return 0 if summary["status"] == "done" else 130

"""The `minisd` command. Each subcommand lives in minisd/commands/<name>.py with two functions:

    configure(parser)  adds the subcommand's options (every option has a help text)
    run(args) -> int   does the work and returns the exit status

Modules are imported only when their subcommand runs, so `minisd tokenize` does not load the U-Net code.
User errors (bad option, missing file, unsupported checkpoint) are `minisd.errors.UserError`: they print one
clear message and exit with status 2, never a traceback.
"""
import argparse
import importlib
import importlib.util
import sys

from .errors import UserError

# name -> (module, one-line help). Order is the order `minisd --help` lists them.
COMMANDS = {
    "txt2img": ("minisd.commands.txt2img", "generate images from a text prompt"),
    "img2img": ("minisd.commands.img2img", "transform an image guided by a text prompt"),
    "convert": ("minisd.commands.convert", "convert a Stable Diffusion checkpoint to minisd's format"),
    "verify": ("minisd.commands.verify", "compare minisd with diffusers block by block on a checkpoint"),
    "tokenize": ("minisd.commands.tokenize", "print the 77 CLIP token ids of a prompt as JSON"),
    "train": ("minisd.commands.train", "train a model from a recipe"),
    "sample": ("minisd.commands.sample", "sample from a trained checkpoint"),
    "eval": ("minisd.commands.eval", "evaluate samples with the offline classifier metrics"),
    "download": ("minisd.commands.download", "download MNIST / Fashion-MNIST / CIFAR-10 with checksums"),
}


def _available():
    """Subcommands whose module exists in this install (the list grows as minisd does)."""
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, help_)
    return out


def build_parser():
    parser = argparse.ArgumentParser(prog="minisd", description="Stable Diffusion from scratch in NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(mod).configure(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        print(f"minisd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minisd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

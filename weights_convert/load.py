"""`load_model(path)`: any Stable Diffusion checkpoint minisd reads -> a `StableDiffusion`, with one clear error
for everything it cannot read.

    a model written by `minisd convert`     .safetensors with "minisd" metadata        (minisd/sdmodel.py)
    an original single-file checkpoint      .ckpt / .pt / .pth (torch zip or legacy), .safetensors without it
                                            (weights_convert/single_file.py)
    a diffusers folder                      model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
                                            (weights_convert/diffusers_folder.py)

Every failure a user can cause (missing path, damaged file, code in a pickle, SDXL/SD3/FLUX, a LoRA, ...) is a
`minisd.errors.UserError` whose message names the path and says what to do next.
"""
import json
from pathlib import Path

import numpy as np

from minisd.errors import UserError
from minisd.sdmodel import StableDiffusion, read_minisd_meta
from minisd.io import safetensors

from .diffusers_folder import is_diffusers_folder, load_diffusers_folder
from .single_file import load_single_file



def describe_kind(path):
    """"minisd" | "single_file" | "diffusers" for an existing path (UserError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}. Pass a .ckpt or .safetensors file, a diffusers folder "
                        f"(with unet/, vae/, text_encoder/), or a model written by `minisd convert`")
    if path.is_dir():
        if is_diffusers_folder(path):
            return "diffusers"
        raise UserError(f"{path}: a folder, but not a diffusers Stable Diffusion folder (no model_index.json or "
                        f"unet/config.json); pass the checkpoint file itself or the folder that holds unet/, vae/, "
                        f"text_encoder/")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return "minisd" if read_minisd_meta(path) is not None else "single_file"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "single_file"
    raise UserError(f"{path}: not a checkpoint minisd can read (neither .safetensors nor a torch.save zip/pickle "
                    f"file); for a diffusers model pass its folder")


def _looks_like_safetensors(head):
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def load_model(path, extract_ema=False, dtype=np.float32, variant=None, prediction_type=None):
    """Load any supported checkpoint -> StableDiffusion (see the module docstring).

    extract_ema: use the EMA weights of a single file that has them (`model_ema.*`).
    variant: diffusers folders only: None (the fp32 files, else fp16) or "fp16".
    prediction_type: override the detected one ("epsilon" / "v_prediction"; single files only, where SD 2.x's is
    guessed from global_step as diffusers does). The model gets `default_sampler`, the sampler its files name.
    """
    path = Path(path)
    kind = describe_kind(path)
    if kind == "diffusers":
        if extract_ema:
            raise UserError(f"{path}: --extract-ema applies to single-file checkpoints; a diffusers folder holds "
                            f"one set of U-Net weights")
        model = load_diffusers_folder(path, variant=variant, dtype=dtype)
    elif kind == "minisd":
        if extract_ema:
            raise UserError(f"{path}: a minisd model holds one set of weights; --extract-ema applies when "
                            f"converting the original checkpoint")
        model = StableDiffusion.from_tensors(safetensors.load(path), read_minisd_meta(path), dtype=dtype)
    else:
        model, _ = load_single_file(path, extract_ema=extract_ema, dtype=dtype, prediction_type=prediction_type)
    return model


def minisd_metadata(model):
    """The "minisd" metadata document for `model` (sdmodel's config_dict, which includes the default sampler)."""
    return json.dumps(model.config_dict())

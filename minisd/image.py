"""Images in and out: array <-> PIL conversions exactly as diffusers' image processor does them, PNG files with
the generation parameters in their metadata, atomic writes, grids.

Shapes: model images are (N, C, H, W) float arrays in [-1, 1] (C = 3 for SD, 1 for MNIST models); PIL images are
H x W, mode "RGB" or "L".

Conversions follow diffusers' VaeImageProcessor (postprocess / preprocess) so a minisd image equals diffusers'
pixel for pixel when the latents agree:
  out: x -> clamp(x / 2 + 0.5, 0, 1) -> round(255 x) -> uint8        (float32 arithmetic, round half to even as
                                                                      numpy and torch both do)
  in:  uint8 -> x / 255 -> 2 x - 1 (float32); resized with Lanczos to the requested size when it differs.
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/image_processor.py (postprocess, numpy_to_pil,
  preprocess, normalize)

PNG metadata (tEXt chunks): "parameters" holds the A1111-style text that common image viewers and web UIs read
  a photo of a cat
  Negative prompt: blurry
  Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15
and "minisd" the same parameters as JSON (exact values, for scripts).
"""
import json
import os
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# arrays <-> PIL

def to_uint8(x):
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, as diffusers' postprocess + numpy_to_pil."""
    x = to_numpy(x).astype(np.float32, copy=False)
    if x.ndim != 4:
        raise ValueError(f"to_uint8: expected (N, C, H, W) images, got shape {x.shape}")
    y = np.clip(x / np.float32(2) + np.float32(0.5), 0, 1)  # float32 like diffusers' (x / 2 + 0.5).clamp(0, 1)
    y = np.round(y * np.float32(255)).astype(np.uint8)
    return y.transpose(0, 2, 3, 1)  # (N, H, W, C)


def to_pil(x):
    """(N, C, H, W) float in [-1, 1] -> list of N PIL images (C = 1: mode "L", C = 3: "RGB")."""
    from PIL import Image
    out = []
    for a in to_uint8(x):
        if a.shape[2] == 1:
            out.append(Image.fromarray(np.ascontiguousarray(a[:, :, 0])))  # mode "L"
        elif a.shape[2] == 3:
            out.append(Image.fromarray(np.ascontiguousarray(a)))  # mode "RGB"
        else:
            raise ValueError(f"to_pil: images need 1 or 3 channels, got {a.shape[2]}")
    return out


def from_pil(image, width=None, height=None, channels=3):
    """A PIL image (or a path to one) -> (1, channels, H, W) float32 in [-1, 1], resized with Lanczos to
    width x height when given and different (diffusers' preprocess). Transparency is dropped (RGB / L)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        image = open_image(image)
    image = image.convert("RGB" if channels == 3 else "L")
    if width is not None and height is not None and image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    a = np.asarray(image, dtype=np.float32) / np.float32(255)  # (H, W, C) or (H, W)
    a = a.reshape(a.shape[0], a.shape[1], -1).transpose(2, 0, 1)[None]  # (1, C, H, W)
    return (a * np.float32(2) - np.float32(1)).astype(np.float32)


def open_image(path):
    """Open an image file with a clear error (UserError) if it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def make_grid(images, cols=None):
    """PIL images of one size -> one PIL image, `cols` per row (default: as square as possible)."""
    from PIL import Image
    if not images:
        raise ValueError("make_grid: no images")
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# metadata and files

def parameters_text(p):
    """A1111-style "parameters" text from a dict with prompt, negative_prompt, steps, sampler, guidance, seed,
    width, height, model (+ strength for img2img)."""
    lines = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p.get("steps")), ("Sampler", p.get("sampler")), ("CFG scale", p.get("guidance")),
              ("Seed", p.get("seed")), ("Size", f"{p.get('width')}x{p.get('height')}" if p.get("width") else None),
              ("Model", p.get("model")), ("Denoising strength", p.get("strength")),
              ("CFG rescale", p.get("guidance_rescale") or None)]
    if p.get("karras"):
        fields[1] = ("Sampler", f"{p.get('sampler')} karras")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_metadata(parameters):
    """PngInfo with "parameters" (A1111 text) and "minisd" (JSON)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", parameters_text(parameters))
    info.add_text("minisd", json.dumps(parameters, default=str))
    return info


def check_writable(paths, overwrite=False):
    """Fail early (before a long generation) if an output exists (without overwrite) or its folder is missing."""
    for p in map(Path, paths):
        if p.exists() and not overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it, or choose another --out")
        if not p.parent.is_dir():
            raise UserError(f"output folder {p.parent} does not exist")


def save_png(image, path, parameters=None, overwrite=False):
    """Write a PIL image as PNG atomically: a temp file in the same folder, then a rename, so a crash never leaves
    a half-written image. Without overwrite an existing file is never replaced (link, not rename: atomic and
    refuses an existing target even if one appeared during the generation)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = folder / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG", pnginfo=png_metadata(parameters) if parameters is not None else None)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails with FileExistsError if path exists
            except FileExistsError:
                raise UserError(f"{path} exists; pass --overwrite to replace it") from None
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    raise UserError(f"{path} exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_png_parameters(path):
    """(A1111 text, parsed JSON dict or None) from a PNG written by save_png."""
    from PIL import Image
    with Image.open(path) as im:
        text = im.text if hasattr(im, "text") else im.info
        js = text.get("minisd")
        return text.get("parameters"), (json.loads(js) if js else None)

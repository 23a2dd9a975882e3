"""`convert(src, dst, dtype)`: any checkpoint minisd reads -> one minisd-format `.safetensors` file.

The output is sdmodel.py's format (tensors under their LDM names + a "minisd" JSON metadata entry with every
config), plus the default sampler of the source (`default_sampler`, e.g. "pndm" for SD 1.5's files) so a converted
model samples like the original. The file is written atomically (temp file + rename) and one tensor at a time, so
converting a memory-mapped 4 GB checkpoint needs little more than one tensor of extra memory.

    from weights_convert.convert import convert
    convert("v1-5-pruned-emaonly.safetensors", "sd15.safetensors", dtype="fp16")
"""
from pathlib import Path

import numpy as np

from minisd.errors import UserError
from minisd.io import safetensors

from .load import load_model, minisd_metadata

DTYPES = {"fp32": np.float32, "fp16": np.float16}


def convert(src, dst, dtype="fp32", extract_ema=False, overwrite=False, prediction_type=None):
    """Read `src` (single file, diffusers folder or minisd file) and write `dst` in minisd format.

    dtype: "fp32" or "fp16" (storage; minisd always computes in float32). extract_ema: use a single file's EMA
    weights. Returns the loaded StableDiffusion (weights as they were read, not converted).
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise UserError(f"output {dst}: minisd models are .safetensors files; name it e.g. {dst.stem}.safetensors")
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise UserError(f"output folder {dst.parent} does not exist")
    if Path(src).resolve() == dst.resolve():
        raise UserError("input and output are the same file")
    model = load_model(src, extract_ema=extract_ema, prediction_type=prediction_type)
    target = np.dtype(DTYPES[dtype])
    # safetensors.save converts each tensor to its stored dtype while writing it (never the whole model at once)
    names = {"fp32": "F32", "fp16": "F16"}
    tensors = model.state_dict()
    dtypes = {k: names[dtype] for k, v in tensors.items() if v.dtype.kind == "f" and v.dtype != target}
    try:
        safetensors.save(tensors, dst, metadata={"minisd": minisd_metadata(model)}, dtypes=dtypes or None)
    except OSError as e:
        raise UserError(f"cannot write {dst}: {e}") from None
    return model

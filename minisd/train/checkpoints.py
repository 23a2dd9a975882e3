"""Checkpoint files (everything needed to resume exactly) and exported model files (what sample/eval/txt2img read).

Both are single `.safetensors` files written atomically by io.safetensors.save (temp file in the same folder,
fsync, rename): a crash or SIGKILL in the middle of a write leaves the previous file untouched and at most a hidden
`.ckpt-....tmp` file, which list_checkpoints ignores and clean_temp_files removes.

Checkpoint  RUN/checkpoints/ckpt-00001000.safetensors
    tensors   model/<name>        live float32 weights of every trained part
              optim/<key>         AdamW.state_dict() (moments, per-parameter step counts, hyper-parameters)
              ema/<key>           EMA.state_dict() (shadow weights, number of updates)
              frozen/<name>       pretrained parts that are not trained (the latent model's VAE and text encoder)
    metadata  "minisd_checkpoint": JSON {format, version, recipe (complete), step, sampler (EpochSampler state:
              epoch, position, generator state), rng (the step generator's state), task_state, frozen_meta,
              log_window, elapsed_s, created}
Exported model  RUN/model.safetensors (EMA weights)
    metadata  "minisd_model": JSON {"kind": classifier | pixel_ddpm | vae | clip | sd, configs, dataset, ...};
              kind "sd" files are also complete minisd StableDiffusion files ("minisd" metadata, read by
              sdmodel.load_minisd) and may carry extra tensors (clip_image.*, classifier.*) for evaluation.
"""
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import safetensors
from ..nn import Params

CKPT_KEY = "minisd_checkpoint"
MODEL_KEY = "minisd_model"
CKPT_FORMAT = "minisd-train-checkpoint"
VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d{8})\.safetensors$")


class ModelFile:
    """An exported model: kind, metadata dict, {name: array} tensors (memory-mapped, read-only), path."""

    def __init__(self, kind, meta, tensors, path):
        self.kind, self.meta, self.tensors, self.path = kind, meta, tensors, str(path)

    def params(self, prefix):
        """The tensors under `prefix` as a float32 Params (fp16-stored weights are converted)."""
        sel = {k: np.array(v, dtype=np.float32) for k, v in self.tensors.items() if k.startswith(prefix)}
        if not sel:
            raise UserError(f"{self.path}: no tensors under {prefix!r}; the file does not contain this part")
        return Params(sel)


def _json_meta(path, md, key):
    try:
        return json.loads(md[key])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the {key!r} metadata is not valid JSON ({e}); the file is damaged") from None


def load_model_file(path):
    """Read an exported model (or a checkpoint, kind "checkpoint"). Clear UserErrors for missing/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist (train it first: docs/training.md lists the commands)")
    md = safetensors.read_metadata(path)  # validates the header; a corrupt file raises a SafetensorsError
    if MODEL_KEY in md:
        meta = _json_meta(path, md, MODEL_KEY)
    elif CKPT_KEY in md:
        meta = _json_meta(path, md, CKPT_KEY)
        meta["kind"] = "checkpoint"
    elif "minisd" in md:
        meta = {"kind": "sd"}  # a converted SD model without training extras
    else:
        raise UserError(f"{path}: not a minisd model or checkpoint (no minisd metadata); convert foreign Stable "
                        f"Diffusion files with `minisd convert`")
    return ModelFile(meta.get("kind", "unknown"), meta, safetensors.load(path), path)


def write_model_file(path, tensors, meta, sd_meta=None, dtype=None):
    """Export: tensors + {"minisd_model": meta} (+ {"minisd": sd_meta} for a StableDiffusion). dtype "F16" stores
    float32 weights in half precision (the shipped model)."""
    md = {MODEL_KEY: json.dumps(meta)}
    if sd_meta is not None:
        md["minisd"] = json.dumps(sd_meta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.save(tensors, path, metadata=md, dtypes=dtype)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_dir(run_dir):
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir):
    """[(step, path)] of complete checkpoints, oldest first. Temp files of interrupted writes are not listed."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def clean_temp_files(run_dir):
    """Remove temp files left by a write that was killed (they are never valid checkpoints). Returns them."""
    d = checkpoint_dir(run_dir)
    gone = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".ckpt-") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def save_checkpoint(run_dir, step, tensors, meta, keep_last):
    """Write RUN/checkpoints/ckpt-<step>.safetensors atomically, then delete all but the newest keep_last."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"ckpt-{step:08d}.safetensors"
    meta = dict(meta, format=CKPT_FORMAT, version=VERSION, step=int(step),
                created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    safetensors.save(tensors, path, metadata={CKPT_KEY: json.dumps(meta)})
    # only now, with the new file complete and renamed into place, are older ones deleted
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path):
    """(meta, tensors) of a checkpoint file; UserError if it is not one."""
    path = Path(path)
    md = safetensors.read_metadata(path)
    if CKPT_KEY not in md:
        kind = "an exported model" if MODEL_KEY in md or "minisd" in md else "not a minisd checkpoint"
        raise UserError(f"{path} is {kind}; --resume needs a training checkpoint (RUN/checkpoints/ckpt-*.safetensors)")
    meta = _json_meta(path, md, CKPT_KEY)
    if meta.get("format") != CKPT_FORMAT:
        raise UserError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise UserError(f"{path}: checkpoint version {meta['version']} is newer than this minisd ({VERSION})")
    return meta, safetensors.load(path)


def latest_checkpoint(run_dir, log=print):
    """The newest checkpoint that reads back (a damaged newest file is reported and skipped), or None."""
    for step, p in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(p) + (p,)
        except UserError as e:
            log(f"warning: skipping unreadable checkpoint {p}: {e}")
    return None


def split_prefixed(tensors, prefix):
    """{prefix + key: v} -> {key: v} for the keys under prefix."""
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def prefixed(prefix, d):
    return {prefix + k: v for k, v in d.items()}


def fsync_append(path, line):
    """Append one line to a text file and flush it to disk (the JSONL log survives a SIGKILL)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())

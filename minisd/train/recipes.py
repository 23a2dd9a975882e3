"""Training recipes: named presets and JSON recipe files, validated key by key. No code is ever executed.

A recipe is one flat JSON object. Common keys (every task) and task keys are listed in COMMON and TASK_KEYS below
with their defaults; model configs are nested objects whose fields are the config dataclasses' own (yaml) names:

    {"base": "mnist_ddpm",              # optional: start from a named preset, then override
     "steps": 3000, "lr": 5e-4,
     "unet": {"model_channels": 48}}    # nested objects are merged into the base's field by field

`minisd train --recipe NAME|FILE.json [--set key=value ...]`; `minisd train --print-recipe NAME` prints a preset as
JSON to start a file from. Unknown keys, wrong types and invalid model configs are UserErrors that name the key,
the accepted keys (with a "did you mean") and the file, before any data is loaded.

Tasks:
  classifier   ConvNet + cross-entropy (the evaluation classifier; minisd.train.classifier)
  pixel_ddpm   U-Net on pixels, L_simple, optional class conditioning with label dropout for CFG (diffusion.py)
  vae          AutoencoderKL, L1 reconstruction + KL (autoencoder.py)
  clip         image ConvNet + CLIP text transformer, symmetric contrastive loss (clip.py)
  latent_ddpm  U-Net on VAE latents, cross-attending to the frozen CLIP text encoder (diffusion.py)

Why presets are plain dicts and files are JSON: configuration must not run code (nanoGPT's `exec(configurator.py)`
is the counter-example, ../shared/docs/style.md principle 8), and a checkpoint stores its full recipe as JSON so
`--resume` can refuse a checkpoint that was made by a different recipe.
"""
import copy
import dataclasses
import difflib
import json
import math
from pathlib import Path

from ..errors import UserError

TASKS = ("classifier", "pixel_ddpm", "vae", "clip", "latent_ddpm")
DATASETS = ("mnist", "fashion_mnist", "cifar10")
AUGMENTS = ("none", "flip", "shift")

# Keys every recipe has, with defaults. (A None default accepts null or a value of the type in NULLABLE.)
COMMON = {
    "name": "",  # e.g. "mnist_ddpm"; written into logs, checkpoints and exported models
    "task": "",  # one of TASKS
    "dataset": "mnist",  # mnist | fashion_mnist | cifar10
    "seed": 0,  # model init, data order, noise: everything random derives from it
    "steps": 1000,  # optimizer steps in total
    "batch_size": 64,
    "lr": 1e-3,  # peak learning rate (after warmup)
    "min_lr": 0.0,  # learning rate at the end of the cosine decay
    "warmup_steps": 100,  # linear warmup from 0
    "weight_decay": 0.0,  # AdamW's decoupled decay
    "betas": [0.9, 0.999],  # AdamW
    "adam_eps": 1e-8,
    "grad_clip": 1.0,  # clip the global gradient norm to this (0: no clipping, the norm is still logged)
    "ema_decay": 0.999,  # EMA of the weights (0: no EMA); exported models and sample grids use the EMA weights
    "log_every": 10,  # JSONL log line (mean loss of the last log_every steps)
    "sample_every": 500,  # sample grid / evaluation + loss-curve PNG
    "ckpt_every": 500,  # checkpoint (also written at the end and on Ctrl-C / SIGTERM)
    "keep_last": 3,  # checkpoints kept (older ones are deleted once a newer one is safely on disk)
    "pad": 0,  # zero-pad (black, -1) each side: MNIST 28 -> 32 with pad 2 for the VAE / latent model
    "rgb": False,  # repeat a grey channel 3 times (the shipped SD model is RGB like every SD model)
    "augment": "none",  # none | flip (random horizontal flip, CIFAR) | shift (random +-2 px translation)
    "notes": "",
}

# Per-task keys and defaults. Nested config dicts are filled from the named preset in PRESETS.
TASK_KEYS = {
    "classifier": {
        "model": {},  # ConvNetConfig fields
        "eval_size": 2000,  # test images scored at every sample_every (the final export scores the full test set)
    },
    "pixel_ddpm": {
        "unet": {},  # UNetConfig fields
        "scheduler": {},  # SchedulerConfig fields (diffusers' names)
        "class_conditional": True,  # label_emb over num_classes + 1 rows: the last row is the "no class" token
        "label_dropout": 0.1,  # share of labels replaced by the null class while training (for CFG)
        "sampler": "ddim",  # for sample grids and `minisd sample` defaults
        "sample_steps": 50,
        "guidance_scale": 3.0,  # classifier-free guidance for sample grids (1: none)
        "grid_columns": 8,
    },
    "vae": {
        "vae": {},  # VAEConfig fields
        "kl_weight": 1e-6,  # LDM's kl_weight; the reconstruction term is a per-image sum of |x - x_rec|
        "eval_size": 1000,
    },
    "clip": {
        "text": {},  # CLIPTextConfig fields
        "image": {},  # ConvNetConfig fields (out_dim = the shared embedding width)
        "captions": [],  # templates with {name} (seven) and/or {digit} (7); default: clip.CAPTION_TEMPLATES
        "logit_scale_init": math.log(1 / 0.07),  # CLIP's initial temperature; clamped at log(100) as CLIP does
        "eval_size": 2000,
    },
    "latent_ddpm": {
        "unet": {},
        "scheduler": {},
        "vae_model": "runs/mnist_vae/model.safetensors",  # exported by `minisd train --recipe mnist_vae`
        "clip_model": "runs/mnist_clip/model.safetensors",  # exported by `minisd train --recipe mnist_clip`
        "caption_dropout": 0.1,  # share of captions replaced by "" while training (SD's 10%, for CFG)
        "sampler": "ddim",
        "sample_steps": 50,
        "guidance_scale": 3.0,
        "grid_columns": 8,
        "latent_batches": 20,  # batches encoded to measure the latent std (scale_factor = 1 / std, as SD did)
    },
}

# Keys that may differ between a checkpoint's recipe and the one given with --resume (they do not change what is
# computed at a step, except `steps`, which stretches the cosine schedule: allowed, with a warning).
RESUMABLE_CHANGES = ("steps", "log_every", "sample_every", "ckpt_every", "keep_last", "notes")

# Nested model-config keys -> the dataclass that validates them (resolved lazily: importing a recipe list must not
# import the models).
CONFIG_KEYS = {"model": "convnet", "image": "convnet", "unet": "unet", "vae": "vae", "text": "clip_text",
               "scheduler": "scheduler"}


def _config_class(kind):
    if kind == "convnet":
        from .classifier import ConvNetConfig
        return ConvNetConfig
    if kind == "unet":
        from ..models.unet import UNetConfig
        return UNetConfig
    if kind == "vae":
        from ..models.vae import VAEConfig
        return VAEConfig
    if kind == "clip_text":
        from ..models.clip import CLIPTextConfig
        return CLIPTextConfig
    from ..diffusion.schedule import SchedulerConfig
    return SchedulerConfig


# ----------------------------------------------------------------------------------------------------------------
# named presets. Model sizes are chosen for 2 CPU cores; docs/training.md has the measured time of each.

# DDPM's schedule (Ho et al. 2020): linear betas 1e-4 .. 0.02 over 1000 steps; samples clipped to [-1, 1].
DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
                  "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0}
# Stable Diffusion's schedule (scaled_linear 0.00085 .. 0.012, latents are not clipped).
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
                "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}

MNIST_CONVNET = {"in_channels": 1, "widths": [32, 64, 128], "blocks_per_stage": 1, "norm_groups": 8, "out_dim": 10}

PRESETS = {
    "mnist_classifier": {
        "task": "classifier", "dataset": "mnist", "steps": 1200, "batch_size": 128, "lr": 2e-3, "min_lr": 1e-5,
        "warmup_steps": 100, "weight_decay": 0.05, "ema_decay": 0.998, "augment": "shift", "sample_every": 500,
        "ckpt_every": 500, "model": MNIST_CONVNET,
    },
    "mnist_ddpm": {
        "task": "pixel_ddpm", "dataset": "mnist", "steps": 900, "batch_size": 64, "lr": 2e-3, "min_lr": 1e-5,
        "warmup_steps": 50, "ema_decay": 0.995, "sample_every": 450, "ckpt_every": 100,
        "unet": {"in_channels": 1, "out_channels": 1, "model_channels": 16, "channel_mult": [1, 2, 4],
                 "attention_resolutions": [4], "num_res_blocks": 1, "num_heads": 4, "context_dim": None,
                 "num_classes": 11, "norm_num_groups": 8},
        "scheduler": DDPM_SCHEDULER, "class_conditional": True, "label_dropout": 0.1, "guidance_scale": 3.0,
        "sampler": "ddpm", "sample_steps": 100,  # ancestral sampling: much cleaner than DDIM this early (docs)
    },
    "cifar_classifier": {
        "task": "classifier", "dataset": "cifar10", "steps": 1200, "batch_size": 128, "lr": 2e-3,
        "min_lr": 1e-5, "warmup_steps": 100, "weight_decay": 0.05, "ema_decay": 0.998, "augment": "flip",
        "sample_every": 600, "ckpt_every": 200,
        "model": {"in_channels": 3, "widths": [32, 64, 128], "blocks_per_stage": 1, "norm_groups": 8,
                  "out_dim": 10},
    },
    "cifar_ddpm": {
        "task": "pixel_ddpm", "dataset": "cifar10", "steps": 3000, "batch_size": 32, "lr": 1e-3, "min_lr": 1e-5,
        "warmup_steps": 100, "ema_decay": 0.995, "augment": "flip", "sample_every": 1000, "ckpt_every": 250,
        "unet": {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1, 2, 2],
                 "attention_resolutions": [4], "num_res_blocks": 1, "num_heads": 4, "context_dim": None,
                 "num_classes": 11, "norm_num_groups": 8, "dropout": 0.0},
        "scheduler": DDPM_SCHEDULER, "class_conditional": True, "label_dropout": 0.1, "guidance_scale": 3.0,
        "sampler": "ddpm", "sample_steps": 100,
    },
    "cifar_ddpm_uncond": {
        "base": "cifar_ddpm", "unet": {"num_classes": None}, "class_conditional": False, "label_dropout": 0.0,
        "guidance_scale": 1.0,
    },
    "mnist_ddpm_uncond": {
        "base": "mnist_ddpm", "unet": {"num_classes": None}, "class_conditional": False, "label_dropout": 0.0,
        "guidance_scale": 1.0,
    },
    "mnist_vae": {
        "task": "vae", "dataset": "mnist", "pad": 2, "rgb": True, "steps": 600, "batch_size": 32, "lr": 1e-3,
        "min_lr": 1e-5, "warmup_steps": 100, "ema_decay": 0.995, "sample_every": 300, "ckpt_every": 100,
        "vae": {"in_channels": 3, "out_ch": 3, "ch": 16, "ch_mult": [1, 2, 4], "num_res_blocks": 1,
                "attn_resolutions": [], "resolution": 32, "z_channels": 4, "double_z": True, "embed_dim": 4,
                "dropout": 0.0, "scale_factor": 1.0, "norm_num_groups": 8},
        "kl_weight": 1e-6,
    },
    "mnist_clip": {
        "task": "clip", "dataset": "mnist", "steps": 1000, "batch_size": 128, "lr": 1e-3, "min_lr": 1e-5,
        "warmup_steps": 100, "weight_decay": 0.05, "ema_decay": 0.995, "augment": "shift", "sample_every": 500,
        "ckpt_every": 250,
        "text": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 64},
        "image": {"in_channels": 1, "widths": [16, 32, 64], "blocks_per_stage": 1, "norm_groups": 8,
                  "out_dim": 64, "head_bias": False},
    },
    "mnist_ldm": {
        "task": "latent_ddpm", "dataset": "mnist", "pad": 2, "rgb": True, "steps": 2000, "batch_size": 64,
        "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 100, "ema_decay": 0.995, "sample_every": 500,
        "ckpt_every": 250,
        "unet": {"in_channels": 4, "out_channels": 4, "model_channels": 48, "channel_mult": [1, 2],
                 "attention_resolutions": [1, 2], "num_res_blocks": 1, "num_heads": 4, "context_dim": 64,
                 "norm_num_groups": 16},
        "scheduler": SD_SCHEDULER, "caption_dropout": 0.1, "guidance_scale": 3.0,
    },
}


# ----------------------------------------------------------------------------------------------------------------
# loading and validation

def list_presets():
    """[(name, task, dataset)] of the named presets."""
    return [(n, r["task"], r["dataset"]) for n, r in PRESETS.items()]


def defaults(task):
    """The full default recipe of a task (common keys + task keys)."""
    if task not in TASKS:
        raise UserError(f"recipe: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    d = copy.deepcopy(COMMON)
    d.update(copy.deepcopy(TASK_KEYS[task]))
    d["task"] = task
    return d


def _merge(base, over):
    """Recursive dict merge: nested objects are merged field by field, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


for _name, _r in list(PRESETS.items()):  # "base" inside a preset: merge it here, once
    if "base" in _r:
        _b = _r.pop("base")
        PRESETS[_name] = _r = _merge(PRESETS[_b], _r)
    _r["name"] = _name


def _read_json(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"recipe file {path}: cannot read it ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"recipe file {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict):
        raise UserError(f"recipe file {path}: the top level must be a JSON object {{...}}, got {type(d).__name__}")
    return d


def load_recipe(spec, overrides=()):
    """A preset name or a JSON file path (+ "key=value" overrides) -> the full, validated recipe dict."""
    where = "recipe"
    if spec in PRESETS:
        raw, where = copy.deepcopy(PRESETS[spec]), f"preset {spec!r}"
    elif str(spec).endswith(".json") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise UserError(f"recipe file {spec} does not exist")
        raw, where = _read_json(spec), f"recipe file {spec}"
        if not raw.get("name"):
            raw["name"] = Path(spec).stem  # a file is its own recipe, also when it starts from a base
        base = raw.pop("base", None)
        if base is not None:
            if base not in PRESETS:
                raise UserError(f"{where}: \"base\": {base!r} is not a preset; presets: {', '.join(PRESETS)}")
            raw = _merge(PRESETS[base], raw)
    else:
        hint = difflib.get_close_matches(str(spec), list(PRESETS), n=1)
        raise UserError(f"unknown recipe {spec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") +
                        f"; give a preset name ({', '.join(PRESETS)}) or a .json recipe file")
    for item in overrides:
        raw = _merge(raw, parse_override(item))
    if overrides:
        where += " with --set " + " ".join(overrides)
    return validate(raw, where)


def parse_override(item):
    """'lr=5e-4' or 'unet.model_channels=48' -> nested dict. The value is read as JSON, else as a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value (e.g. --set steps=2000 or --set unet.model_channels=48)")
    key, value = item.split("=", 1)
    try:
        v = json.loads(value)
    except json.JSONDecodeError:
        v = value
    out = v
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def _type_ok(default, value):
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _type_name(v):
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}[type(v)]


def validate(raw, where="recipe"):
    """Check every key and value; returns the full recipe (defaults filled in, model configs complete)."""
    task = raw.get("task")
    if task not in TASKS:
        raise UserError(f"{where}: \"task\" must be one of {', '.join(TASKS)}, got {task!r}")
    full = defaults(task)
    unknown = [k for k in raw if k not in full]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(k, list(full), n=1)
        raise UserError(f"{where}: unknown recipe key {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") +
                        f". Keys of a {task} recipe: {', '.join(sorted(full))}")
    for k, v in raw.items():
        if not _type_ok(full[k], v):
            raise UserError(f"{where}: {k!r} must be {_type_name(full[k])}, got {json.dumps(v)}")
        full[k] = copy.deepcopy(v)
    if full["dataset"] not in DATASETS:
        raise UserError(f"{where}: \"dataset\" must be one of {', '.join(DATASETS)}, got {full['dataset']!r}")
    if full["augment"] not in AUGMENTS:
        raise UserError(f"{where}: \"augment\" must be one of {', '.join(AUGMENTS)}, got {full['augment']!r}")
    positive = ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "keep_last")
    for k in positive:
        if full[k] < 1:
            raise UserError(f"{where}: {k!r} must be >= 1, got {full[k]}")
    if full["warmup_steps"] < 0 or full["warmup_steps"] > full["steps"]:
        raise UserError(f"{where}: \"warmup_steps\" must lie in [0, steps={full['steps']}], got "
                        f"{full['warmup_steps']}")
    if not (0 <= full["ema_decay"] < 1):
        raise UserError(f"{where}: \"ema_decay\" must lie in [0, 1), got {full['ema_decay']}")
    if len(full["betas"]) != 2 or not all(0 <= b < 1 for b in full["betas"]):
        raise UserError(f"{where}: \"betas\" must be two numbers in [0, 1), got {full['betas']}")
    if full["lr"] <= 0 or full["min_lr"] < 0 or full["grad_clip"] < 0 or full["weight_decay"] < 0:
        raise UserError(f"{where}: lr must be > 0 and min_lr, grad_clip, weight_decay >= 0")
    if full["pad"] < 0:
        raise UserError(f"{where}: \"pad\" must be >= 0, got {full['pad']}")
    for p in ("label_dropout", "caption_dropout"):
        if p in full and not 0 <= full[p] < 1:
            raise UserError(f"{where}: {p!r} must lie in [0, 1), got {full[p]}")
    for k, kind in CONFIG_KEYS.items():
        if k in full:
            full[k] = check_config(kind, full[k], f"{where}: {k!r}")
    return full


def check_config(kind, d, where):
    """Validate a nested config dict by building its dataclass; returns the complete dict (every field)."""
    cls = _config_class(kind)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], names, n=1)
        raise UserError(f"{where}: unknown field {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; {cls.__name__} has {', '.join(names)}")
    try:
        cfg = cls(**{k: tuple(v) if isinstance(v, list) and k != "trained_betas" else v for k, v in d.items()})
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid {cls.__name__}: {e}") from None
    return config_to_dict(cfg)


def config_to_dict(cfg):
    """Dataclass -> JSON-ready dict (tuples as lists)."""
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in dataclasses.fields(cfg)}


def build_config(kind, d):
    """A validated config dict -> its dataclass instance."""
    cls = _config_class(kind)
    return cls(**{k: tuple(v) if isinstance(v, list) and k != "trained_betas" else v for k, v in d.items()})


def recipe_differences(saved, given):
    """[(key, saved value, given value)] for keys that differ, RESUMABLE_CHANGES excluded."""
    keys = sorted(set(saved) | set(given))
    return [(k, saved.get(k), given.get(k)) for k in keys
            if k not in RESUMABLE_CHANGES and saved.get(k) != given.get(k)]

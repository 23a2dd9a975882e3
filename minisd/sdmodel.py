"""A whole Stable Diffusion model (text encoder + tokenizer + U-Net + VAE + scheduler settings) and minisd's own
file format for it.

minisd format: ONE `.safetensors` file. Tensors carry the original LDM single-file names
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), so the tensor part *is* an SD
single-file checkpoint; the `__metadata__` entry "minisd" holds a small JSON document with everything shapes
cannot tell (head counts, activations, scheduler, prediction type, tokenizer padding, added tokens):

    {"format": "minisd-sd", "version": 1,
     "unet": {...UNetConfig fields...}, "vae": {...VAEConfig...}, "text_encoder": {...CLIPTextConfig...},
     "scheduler": {...SchedulerConfig (diffusers names)...}, "prediction_type": "epsilon" | "v_prediction",
     "tokenizer": {"pad_id": 49407, "added_tokens": {"<birb-style>": 49408}},
     "sample_size": 64,            # default latent size (image = sample_size * VAE downsample factor)
     "default_sampler": "pndm",    # the sampler the source checkpoint names (SD 1.5: PNDM, SD 2.x: DDIM)
     "scheduler_unset": [...],     # scheduler fields the source did not state: a different sampler takes its own
                                   # defaults for them, as diffusers does when it swaps schedulers
     "name": "...", "notes": "..."}

`weights_convert` turns other formats (LDM .ckpt/.safetensors, diffusers folders) into a `StableDiffusion`;
`StableDiffusion.save` writes the format above and `load_model` reads any of them.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import safetensors
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.unet import UNet, UNetConfig
from .models.vae import VAE, VAEConfig
from .nn import Params
from .tokenizer import CLIPTokenizer

FORMAT = "minisd-sd"
VERSION = 1


def _config_to_dict(cfg):
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v)
            for f in dataclasses.fields(cfg)}


def _config_from_dict(cls, d, what):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"model file: unknown {what} config keys {unknown}; was it written by a newer minisd?")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class StableDiffusion:
    """The three networks plus what is needed to run them. Attributes: unet, vae, text_encoder (minisd models),
    tokenizer (CLIPTokenizer), scheduler (a diffusion.SchedulerConfig), prediction_type, sample_size,
    default_sampler (None: PNDM when the scheduler skips PRK steps as SD 1.x's does, else DDIM), scheduler_unset,
    name, notes."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, prediction_type="epsilon", sample_size=64,
                 name="", notes="", default_sampler=None, scheduler_unset=()):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        if unet.config.context_dim != text_encoder.config.hidden_size:
            raise UserError(f"the U-Net cross-attends to width {unet.config.context_dim} but the text encoder "
                            f"produces {text_encoder.config.hidden_size}: these parts do not belong together")
        if unet.config.in_channels != vae.config.embed_dim and unet.config.in_channels != 9:
            raise UserError(f"the U-Net takes {unet.config.in_channels} channels but the VAE's latents have "
                            f"{vae.config.embed_dim}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.sample_size = int(sample_size)
        self.name, self.notes = name, notes
        self.default_sampler = default_sampler or ("pndm" if scheduler.skip_prk_steps else "ddim")
        self.scheduler_unset = frozenset(scheduler_unset)

    @property
    def vae_scale_factor(self):
        """Pixels per latent pixel (8 for SD)."""
        return self.vae.config.downsample_factor

    def parts(self):
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def state_dict(self):
        out = {}
        for m in self.parts().values():
            out.update(m.params.state_dict())
        return out

    def num_parameters(self):
        return {k: m.params.num_parameters() for k, m in self.parts().items()}

    def to_dtype(self, dtype):
        """Storage dtype of every part (compute stays float32): float16 halves memory."""
        for m in self.parts().values():
            m.params.astype(dtype)
        return self

    def config_dict(self):
        from .diffusion.schedule import SchedulerConfig  # noqa: F401  (type documented above)
        return {"format": FORMAT, "version": VERSION,
                "unet": _config_to_dict(self.unet.config), "vae": _config_to_dict(self.vae.config),
                "text_encoder": _config_to_dict(self.text_encoder.config),
                "scheduler": self.scheduler.to_dict(), "prediction_type": self.prediction_type,
                "tokenizer": {"pad_id": self.tokenizer.pad_id, "added_tokens": dict(self.tokenizer.added_tokens)},
                "sample_size": self.sample_size, "default_sampler": self.default_sampler,
                "scheduler_unset": sorted(self.scheduler_unset), "name": self.name, "notes": self.notes}

    def save(self, path, dtype=None):
        """Write the minisd format (atomically). dtype: e.g. np.float16 to store half-size weights."""
        tensors = self.state_dict()
        if dtype is not None:
            tensors = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        safetensors.save(tensors, path, metadata={"minisd": json.dumps(self.config_dict())})

    @classmethod
    def from_tensors(cls, tensors, meta, dtype=np.float32):
        """Build from {LDM name: array} and the parsed "minisd" metadata document."""
        from .diffusion.schedule import SchedulerConfig
        if meta.get("format") != FORMAT:
            raise UserError("model file: not a minisd model (no 'minisd' metadata); use `minisd convert` first")
        if int(meta.get("version", 0)) > VERSION:
            raise UserError(f"model file: format version {meta['version']} is newer than this minisd ({VERSION})")
        ucfg = _config_from_dict(UNetConfig, meta["unet"], "unet")
        vcfg = _config_from_dict(VAEConfig, meta["vae"], "vae")
        tcfg = _config_from_dict(CLIPTextConfig, meta["text_encoder"], "text_encoder")
        parts = {}
        for key, (klass, cfg) in {"unet": (UNet, ucfg), "vae": (VAE, vcfg),
                                  "text_encoder": (CLIPTextModel, tcfg)}.items():
            prefix = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}.get(key, "cond_stage_model.")
            p = Params({k: v for k, v in tensors.items() if k.startswith(prefix)}, compute_dtype=dtype)
            parts[key] = klass(cfg, params=p, dtype=dtype)
        tok = CLIPTokenizer(pad_id=meta["tokenizer"]["pad_id"])
        added = meta["tokenizer"].get("added_tokens", {})
        if added:
            got = tok.add_tokens(list(added))
            if got != list(added.values()):
                raise UserError(f"model file: added tokens {list(added)} got ids {got}, expected "
                                f"{list(added.values())}")
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], tok,
                   SchedulerConfig.from_dict(meta["scheduler"]), meta.get("prediction_type", "epsilon"),
                   meta.get("sample_size", 64), meta.get("name", ""), meta.get("notes", ""),
                   meta.get("default_sampler"), meta.get("scheduler_unset", ()))


def read_minisd_meta(path):
    """The parsed "minisd" metadata of a .safetensors file, or None when the file has none."""
    meta = safetensors.read_metadata(path)
    if "minisd" not in meta:
        return None
    try:
        return json.loads(meta["minisd"])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the 'minisd' metadata is not valid JSON ({e}); the file is damaged") from None


def load_minisd(path, dtype=np.float32):
    """Load a model written by StableDiffusion.save (memory-mapped; weights are converted on access)."""
    path = Path(path)
    meta = read_minisd_meta(path)
    if meta is None:
        raise UserError(f"{path}: not a minisd model file; convert it with `minisd convert {path} OUT.safetensors`")
    return StableDiffusion.from_tensors(safetensors.load(path), meta, dtype=dtype)

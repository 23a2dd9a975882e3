"""Test-only helpers: build the diffusers/transformers twin of a minisd model and move weights between them.

The reference models are always built by diffusers/transformers from *their* config; weights flow reference ->
minisd through weights_convert.names (the same table the converter uses), so a wrong rename or reshape fails the
parity tests as loudly as a wrong op would.
"""
import numpy as np

from minisd.models import clip as clip_model
from minisd.models import unet as unet_model
from minisd.models import vae as vae_model
from minisd.nn import Params
from weights_convert import names


def diffusers_unet_config(cfg, sample_size=8):
    """UNet2DConditionModel kwargs equivalent to a minisd UNetConfig."""
    levels = len(cfg.channel_mult)
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if 2 ** i in cfg.attention_resolutions else "DownBlock2D" for i in range(levels)]
    up = ["CrossAttnUpBlock2D" if 2 ** i in cfg.attention_resolutions else "UpBlock2D"
          for i in reversed(range(levels))]
    heads = [cfg.heads(w)[0] for w in widths]  # diffusers' attention_head_dim holds head *counts* (issue #2011)
    kw = dict(sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
              block_out_channels=tuple(widths), layers_per_block=cfg.num_res_blocks,
              down_block_types=tuple(down), up_block_types=tuple(up), cross_attention_dim=cfg.context_dim,
              attention_head_dim=tuple(heads), norm_num_groups=cfg.norm_num_groups,
              use_linear_projection=cfg.use_linear_in_transformer,
              transformer_layers_per_block=cfg.transformer_depth)
    if cfg.num_classes is not None:
        kw["num_class_embeds"] = cfg.num_classes
    return kw


def diffusers_vae_config(cfg):
    levels = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_num_groups, sample_size=cfg.resolution,
                scaling_factor=cfg.scale_factor)


def transformers_clip_config(cfg):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                          num_attention_heads=cfg.num_attention_heads,
                          max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                          layer_norm_eps=cfg.layer_norm_eps, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, attn_implementation="eager")


def randomize_(module, seed=0, scale=None):
    """Overwrite every parameter of a torch module with seeded noise, norms included (gamma ~ 1 + 0.1 N, beta ~
    0.1 N), so no weight is a special value (zero, one) that could hide a wrong connection."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
                p.copy_(s * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _file_name(module, k):
    """transformers >= 5 names CLIPTextModel's own parameters without the 'text_model.' prefix that every SD file
    (and names.py) uses; put it back so references are compared under the file names."""
    if type(module).__name__ == "CLIPTextModel" and not k.startswith("text_model."):
        return "text_model." + k
    return k


def state_numpy(module, dtype=np.float32):
    return {_file_name(module, k): v.detach().cpu().numpy().astype(dtype) for k, v in module.state_dict().items()}


def grads_numpy(module):
    """{file name: gradient} of every parameter that has one."""
    return {_file_name(module, k): p.grad.numpy() for k, p in module.named_parameters() if p.grad is not None}


def load_into(module, state):
    """Load {file name: array} into a torch module, whatever prefix convention its version uses."""
    import torch
    own = set(module.state_dict())
    fixed = {}
    for k, v in state.items():
        if k not in own and k.startswith("text_model.") and k[len("text_model."):] in own:
            k = k[len("text_model."):]
        fixed[k] = torch.tensor(np.asarray(v))
    return module.load_state_dict(fixed, strict=False)


def unet_params_from_diffusers(state, cfg, dtype=np.float32):
    """diffusers UNet state (name -> array) -> minisd Params with LDM names."""
    m = names.unet_ldm_to_diffusers(cfg)
    return Params({k: np.ascontiguousarray(state[d], dtype=dtype) for k, d in m.items()}, compute_dtype=dtype)


def vae_params_from_diffusers(state, cfg, dtype=np.float32):
    m = names.vae_ldm_to_diffusers(cfg)
    shapes = vae_model.param_shapes(cfg)
    return Params({k: np.ascontiguousarray(state[d], dtype=dtype).reshape(shapes[k]) for k, d in m.items()},
                  compute_dtype=dtype)


def clip_params_from_transformers(state, cfg, dtype=np.float32):
    m = names.clip_ldm_to_transformers(cfg)
    return Params({k: np.ascontiguousarray(state[d], dtype=dtype) for k, d in m.items()}, compute_dtype=dtype)


def key_bias(name):
    """Biases of attention *keys*: adding b to every key adds q.b to every score of a query, which softmax ignores,
    so their exact gradient is 0 and both implementations return float noise around it."""
    return name.endswith(("k.bias", "to_k.bias", "k_proj.bias"))


def worst_grad_error(model_grads, ref_grads, mapping, shapes=None):
    """max over parameters of rel_error(minisd grad, reference grad). Key biases (see key_bias) are instead
    required to be ~0: |g| <= 1e-4 x the largest gradient of the model in the same precision."""
    from minisd.testing import rel_error
    scale = max(float(np.abs(g).max()) for g in model_grads.values())
    worst, where = 0.0, None
    for k, g in model_grads.items():
        r = ref_grads[mapping[k]].reshape(g.shape)
        if key_bias(k):
            e = max(float(np.abs(g).max()), float(np.abs(r).max())) / scale * 1e-1  # 1e-4 of scale -> 1e-5
        else:
            e = rel_error(g, r)
        if e > worst:
            worst, where = e, k
    return worst, where


def grads_to_reference_names(params, mapping):
    """minisd grads (LDM names) -> {reference name: grad}."""
    return {mapping[k]: g for k, g in params.grads.items()}


__all__ = ["diffusers_unet_config", "diffusers_vae_config", "transformers_clip_config", "randomize_",
           "state_numpy", "unet_params_from_diffusers", "vae_params_from_diffusers",
           "clip_params_from_transformers", "grads_to_reference_names", "worst_grad_error", "key_bias", "grads_numpy", "load_into", "unet_model", "vae_model", "clip_model"]

"""The one rename table between minisd/LDM parameter names and diffusers/transformers names.

minisd's parameters carry the original single-file (LDM) checkpoint keys, so SD files load with no renaming.
diffusers folders name the same tensors differently; this module builds the exact LDM <-> diffusers mapping for a
given config (block indices depend on num_res_blocks and the number of levels) and says which tensors change shape.
Rules from diffusers' own converter, summarised with line references in ../shared/docs/sd-reference.md §2.3:
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/loaders/single_file_utils.py
    convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint

Each `*_ldm_to_diffusers(cfg)` returns {ldm_key: diffusers_key}; `VAE_ATTN_RESHAPE` lists the LDM tensors stored as
1x1 convs (C, C, 1, 1) in LDM files and as Linear (C, C) in diffusers files.
"""
from minisd.models import clip as clip_model
from minisd.models import unet as unet_model
from minisd.models import vae as vae_model

UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RES = {"nin_shortcut": "conv_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(key, table):
    """Rename the first dotted component(s) of `key` found in `table` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return table[old] + key[len(old):]
    return key


def unet_ldm_to_diffusers(cfg, prefix=unet_model.PREFIX):
    """{'model.diffusion_model.input_blocks.1.0.in_layers.0.weight': 'down_blocks.0.resnets.0.norm1.weight', ...}"""
    plan = unet_model.build_plan(cfg)
    per_level = cfg.num_res_blocks + 1  # blocks per level, counting the downsample (input) or upsampler level
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb": "class_embedding", "input_blocks.0.0": "conv_in",
              "out.0": "conv_norm_out", "out.2": "conv_out"}
    for i, block in enumerate(plan.input_blocks[1:], start=1):
        b, layer = (i - 1) // per_level, (i - 1) % per_level
        for L in block:
            if L.kind == "res":
                blocks[L.name] = f"down_blocks.{b}.resnets.{layer}"
            elif L.kind == "st":
                blocks[L.name] = f"down_blocks.{b}.attentions.{layer}"
            else:  # down
                blocks[L.name + ".op"] = f"down_blocks.{b}.downsamplers.0.conv"
    blocks.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                   "middle_block.2": "mid_block.resnets.1"})
    for i, block in enumerate(plan.output_blocks):
        b, layer = i // per_level, i % per_level
        for L in block:
            if L.kind == "res":
                blocks[L.name] = f"up_blocks.{b}.resnets.{layer}"
            elif L.kind == "st":
                blocks[L.name] = f"up_blocks.{b}.attentions.{layer}"
            else:  # up
                blocks[L.name + ".conv"] = f"up_blocks.{b}.upsamplers.0.conv"
    out = {}
    for key in unet_model.param_shapes(cfg, prefix):
        k = key[len(prefix):]
        new = _sub(k, blocks)
        if ".resnets." in new:
            head, tail = new.split(".resnets.", 1)
            idx, rest = tail.split(".", 1)
            new = f"{head}.resnets.{idx}.{_sub(rest, UNET_RES)}"
        out[key] = new  # transformer internals (attn1.to_q, ff.net.0.proj, norm1, proj_in ...) keep their names
    return out


def vae_ldm_to_diffusers(cfg, prefix=vae_model.PREFIX):
    n_levels = len(cfg.ch_mult)
    out = {}
    for key in vae_model.param_shapes(cfg, prefix):
        k = key[len(prefix):]
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down", "up"):
            side, level = parts[0], int(parts[2])
            # LDM numbers decoder levels from the top (up.0 = full resolution); diffusers from the bottom
            lvl = level if side == "encoder" else n_levels - 1 - level
            kind, rest = parts[3], ".".join(parts[4:])
            if kind == "block":
                j, tail = rest.split(".", 1)
                new = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{lvl}.resnets.{j}.{_sub(tail, VAE_RES)}"
            elif kind == "attn":
                j, tail = rest.split(".", 1)
                new = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{lvl}.attentions.{j}.{_sub(tail, VAE_ATTN)}"
            else:  # downsample.conv / upsample.conv
                new = (f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{lvl}."
                       f"{'downsamplers' if side == 'encoder' else 'upsamplers'}.0.{rest}")
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid":
            what, tail = parts[2], ".".join(parts[3:])
            if what == "attn_1":
                new = f"{parts[0]}.mid_block.attentions.0.{_sub(tail, VAE_ATTN)}"
            else:
                new = f"{parts[0]}.mid_block.resnets.{int(what[-1]) - 1}.{_sub(tail, VAE_RES)}"
        elif parts[0] in ("encoder", "decoder") and parts[1] == "norm_out":
            new = f"{parts[0]}.conv_norm_out.{parts[2]}"
        else:
            new = k  # conv_in, conv_out, quant_conv, post_quant_conv
        out[key] = new
    return out


def vae_attention_keys(cfg, prefix=vae_model.PREFIX):
    """LDM keys of VAE attention projections: (C, C, 1, 1) in LDM files, (C, C) in diffusers files."""
    return [k for k in vae_model.param_shapes(cfg, prefix)
            if (".attn_1." in k or ".attn." in k) and k.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out")
            and k.endswith(".weight")]


def clip_ldm_to_transformers(cfg, prefix=None):
    """SD1 (hf layout): strip 'cond_stage_model.transformer.' -> transformers' CLIPTextModel names.
    SD2 (openclip layout) has no 1:1 map (fused q/k/v, transposed projection): see openclip_to_hf_tensors."""
    if cfg.layout != "hf":
        raise ValueError("clip_ldm_to_transformers: only the hf layout maps 1:1; use openclip_to_hf_tensors")
    prefix = clip_model.PREFIXES["hf"] if prefix is None else prefix
    return {k: k[len(prefix):] for k in clip_model.param_shapes(cfg, prefix)}


def openclip_to_hf_tensors(tensors, cfg, prefix=None):
    """OpenCLIP text tensors (SD2 single file) -> {transformers CLIPTextModel name: array}, splitting the fused
    in_proj into q/k/v by rows (as diffusers' convert_open_clip_checkpoint). Layers past the one SD2 uses and the
    projection are dropped, as diffusers drops them."""
    import numpy as np  # noqa: local to keep this module import-light
    prefix = clip_model.PREFIXES["openclip"] if prefix is None else prefix
    D = cfg.hidden_size
    out = {"text_model.embeddings.token_embedding.weight": tensors[prefix + "token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": tensors[prefix + "positional_embedding"],
           "text_model.final_layer_norm.weight": tensors[prefix + "ln_final.weight"],
           "text_model.final_layer_norm.bias": tensors[prefix + "ln_final.bias"]}
    for i in range(cfg.num_hidden_layers - cfg.clip_skip):
        s, d = f"{prefix}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        w, b = np.asarray(tensors[s + "attn.in_proj_weight"]), np.asarray(tensors[s + "attn.in_proj_bias"])
        for j, r in enumerate(("q", "k", "v")):
            out[f"{d}self_attn.{r}_proj.weight"] = w[j * D:(j + 1) * D]
            out[f"{d}self_attn.{r}_proj.bias"] = b[j * D:(j + 1) * D]
        for a, c in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{d}{c}.weight"] = tensors[f"{s}{a}.weight"]
            out[f"{d}{c}.bias"] = tensors[f"{s}{a}.bias"]
    return out

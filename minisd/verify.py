"""`minisd verify`: run a checkpoint's text encoder, U-Net and VAE in minisd and in diffusers on the same inputs and
report, block by block, where the two agree and the first block where they diverge.

What is compared (each component gets identical inputs on both sides, so an error does not leak downstream):
  text encoder  token ids of ["" (unconditional), prompt] -> "embeddings", "layers.i", "final_layer_norm"
  U-Net         one call as in a sampling step: latents x (seeded N(0,1)) duplicated for CFG, the first DDIM
                timestep, context = minisd's text embeddings -> "time_embed", "input_blocks.i", "middle_block",
                "output_blocks.i", "out"
  VAE decode    z = x / scale_factor -> "post_quant_conv", "decoder.conv_in", "decoder.mid", "decoder.up.i",
                "decoder.conv_out"
  VAE encode    the decoded image clipped to [-1, 1] -> "encoder.down.i", "encoder.mid", "quant_conv"
  end to end    `steps` DDIM steps with guidance from the same x (each side with its own components): final
                latents and the 8-bit image (max pixel difference)
The minisd side records outputs with the models' `trace(name, array)` callbacks; the diffusers side with
PyTorch forward hooks on the modules that compute the same tensors (the mapping is in `_unet_modules` etc.).
Errors are `minisd.testing.rel_error` = max|a - b| / max|ref|. A block "diverges" when its error exceeds the
tolerance (default 1e-3: float32 through the whole SD U-Net stays near 1e-5, a wrong weight or op gives
1e-2 or more).

The reference: a diffusers folder is loaded with diffusers' own `from_pretrained`; a single file or minisd file is
read by minisd's readers (bytes only) and renamed by diffusers' own converters (`single_file_utils.convert_ldm_*`),
into diffusers models built from the configuration minisd inferred (diffusers would fetch it from the Hub;
this works offline). `reference=` may name another checkpoint (e.g. the original diffusers folder of a converted
file). torch, diffusers and transformers are imported only inside the reference functions: they are the
reference, never a runtime dependency. Without them only minisd's side runs (shapes, finiteness, timings).
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .testing import rel_error

DEFAULT_TOL = 1e-3


@dataclass
class Side:
    """One implementation's results: traces[component] = {block: array} (in call order), outputs, seconds."""
    traces: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _recorder(store):
    def trace(name, a):
        store[name] = np.array(a, dtype=np.float32)  # a copy: later blocks may reuse buffers
    return trace


# ----------------------------------------------------------------------------------------------------------------
# inputs and the minisd side

def make_inputs(model, prompt, seed, height, width, steps):
    from .diffusion import make_sampler
    f = model.vae_scale_factor
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, model.unet.config.in_channels, height // f, width // f), dtype=np.float32)
    ids = model.tokenizer(["", prompt])  # (2, 77): unconditional, conditional
    smp = make_sampler("ddim", model.scheduler)
    smp.set_timesteps(max(steps, 1))
    return {"x": x, "ids": ids, "t": int(smp.timesteps[0]), "prompt": prompt, "steps": steps}


def run_minisd(model, inputs, guidance=7.5):
    from . import pipeline
    s = Side()
    tr = s.traces.setdefault("text encoder", {})
    t0 = time.perf_counter()
    ctx, _ = model.text_encoder.forward(inputs["ids"], trace=_recorder(tr))
    s.seconds["text encoder"] = time.perf_counter() - t0
    s.outputs["context"] = ctx
    x = inputs["x"]
    tr = s.traces.setdefault("U-Net", {})
    t0 = time.perf_counter()
    model.unet.forward(np.concatenate([x, x]), inputs["t"], ctx, trace=_recorder(tr))
    s.seconds["U-Net"] = time.perf_counter() - t0
    z = x / np.float32(model.vae.config.scale_factor)
    tr = s.traces.setdefault("VAE decode", {})
    t0 = time.perf_counter()
    img, _ = model.vae.decode(z, trace=_recorder(tr))
    s.seconds["VAE decode"] = time.perf_counter() - t0
    image = np.clip(img, -1, 1).astype(np.float32)
    s.outputs["image_in"] = image
    tr = s.traces.setdefault("VAE encode", {})
    t0 = time.perf_counter()
    model.vae.encode(image, trace=_recorder(tr))
    s.seconds["VAE encode"] = time.perf_counter() - t0
    if inputs["steps"] > 0:
        t0 = time.perf_counter()
        r = pipeline.txt2img(model, inputs["prompt"], steps=inputs["steps"], sampler="ddim", guidance=guidance,
                             latents=x, progress=False)
        s.seconds["end to end"] = time.perf_counter() - t0
        s.outputs["latents"] = r.latents
        s.outputs["pixels"] = np.asarray(r.images[0])
    return s


# ----------------------------------------------------------------------------------------------------------------
# the diffusers side (torch imported here only)

def have_reference():
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))


def diffusers_unet_config(cfg, sample_size=64):
    """minisd UNetConfig -> UNet2DConditionModel kwargs (diffusers' attention_head_dim holds head *counts*)."""
    n = len(cfg.channel_mult)
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2 ** i in cfg.attention_resolutions for i in range(n)]
    kw = dict(sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
              block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
              down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
              up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
              cross_attention_dim=cfg.context_dim, attention_head_dim=[cfg.heads(w)[0] for w in widths],
              norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_in_transformer,
              transformer_layers_per_block=cfg.transformer_depth)
    if cfg.num_classes is not None:
        kw["num_class_embeds"] = cfg.num_classes
    return kw


def diffusers_vae_config(cfg):
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch,
                block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, latent_channels=cfg.z_channels,
                norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scale_factor)


def transformers_text_config(cfg):
    """CLIPTextConfig kwargs: the layers SD actually runs (OpenCLIP-H: 23 of 24), in Hugging Face layout."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers - cfg.clip_skip, num_attention_heads=cfg.num_attention_heads,
                max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                layer_norm_eps=cfg.layer_norm_eps, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _load_text_state(text, state):
    """Load a state dict named 'text_model.*' into a CLIPTextModel of either transformers generation (v5 dropped
    the text_model wrapper)."""
    if not hasattr(text, "text_model"):
        state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    own = set(text.state_dict())
    # position_ids are a buffer some exports carry; text_projection belongs to CLIPTextModelWithProjection (a CLIP
    # trained with minisd keeps it in the file) and is never used by SD, which reads the last hidden state.
    state = {k: v for k, v in state.items()
             if k in own or not (k.endswith("position_ids") or k.startswith("text_projection."))}
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"reference text encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    text.load_state_dict(state, strict=False)


def load_reference(path, model):
    """diffusers/transformers models {unet, vae, text_encoder} for the checkpoint at `path` (see module doc)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from weights_convert.load import describe_kind
    path = Path(path)
    kind = describe_kind(path)
    if kind == "diffusers":
        variant = None
        if not any((path / "unet").glob("diffusion_pytorch_model.safetensors*")) and \
                not (path / "unet" / "diffusion_pytorch_model.bin").is_file():
            variant = "fp16"
        kw = dict(torch_dtype=torch.float32, local_files_only=True, variant=variant)
        return {"unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).eval(),
                "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).eval(),
                "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).eval(),
                "how": "diffusers from_pretrained"}
    from diffusers.loaders import single_file_utils as sfu
    if kind == "minisd":
        from .io import safetensors
        tensors = safetensors.load(path)
    else:
        from weights_convert.single_file import read_checkpoint, select_weights
        tensors = select_weights(read_checkpoint(path)[0])
    ck = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}
    ucfg = diffusers_unet_config(model.unet.config)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ck, ucfg), strict=True)
    vcfg = diffusers_vae_config(model.vae.config)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ck, vcfg), strict=True)
    tcfg = model.text_encoder.config
    text = CLIPTextModel(CLIPTextConfig(**transformers_text_config(tcfg)))
    if tcfg.layout == "openclip":
        st = sfu.convert_open_clip_checkpoint(text, ck)
        keep = tcfg.num_hidden_layers - tcfg.clip_skip  # diffusers drops the unused last layer by its SD 2 name
        st = {k: v for k, v in st.items() if not (k.startswith("text_model.encoder.layers.")
                                                  and int(k.split(".")[3]) >= keep)}
    else:
        st = sfu.convert_ldm_clip_checkpoint(ck)
    _load_text_state(text, st)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(),
            "how": "minisd's reader + diffusers' single_file_utils converters"}


def _out(o):
    """A module's output -> the tensor it computes (tuples, diffusers output classes, transformers layers)."""
    if hasattr(o, "sample"):
        o = o.sample
    while isinstance(o, (tuple, list)):
        o = o[0]
    return o


def _hooks(mods, store):
    handles = []
    for name, m in mods.items():
        def hook(_m, _inp, out, name=name):
            store[name] = _out(out).detach().float().numpy().copy()
        handles.append(m.register_forward_hook(hook))
    return handles


def _text_modules(text, n_layers):
    tm = getattr(text, "text_model", text)
    mods = {"embeddings": tm.embeddings}
    mods.update({f"layers.{i}": tm.encoder.layers[i] for i in range(n_layers)})
    mods["final_layer_norm"] = tm.final_layer_norm
    return mods


def _unet_modules(unet, cfg):
    """minisd trace name -> the diffusers module whose output is the same tensor."""
    mods = {"time_embed": unet.time_embedding, "input_blocks.0": unet.conv_in}
    i = 1
    for blk in unet.down_blocks:
        attns = getattr(blk, "attentions", None)
        for j in range(cfg.num_res_blocks):
            mods[f"input_blocks.{i}"] = attns[j] if attns is not None else blk.resnets[j]
            i += 1
        if blk.downsamplers is not None:
            mods[f"input_blocks.{i}"] = blk.downsamplers[0]
            i += 1
    mods["middle_block"] = unet.mid_block
    j = 0
    for blk in unet.up_blocks:
        attns = getattr(blk, "attentions", None)
        for k in range(cfg.num_res_blocks + 1):
            m = attns[k] if attns is not None else blk.resnets[k]
            if k == cfg.num_res_blocks and blk.upsamplers is not None:
                m = blk.upsamplers[0]  # the block's output is the upsampler's
            mods[f"output_blocks.{j}"] = m
            j += 1
    mods["out"] = unet.conv_out
    return mods


def _vae_modules(vae, n_levels, which):
    if which == "decode":
        mods = {"post_quant_conv": vae.post_quant_conv, "decoder.conv_in": vae.decoder.conv_in,
                "decoder.mid": vae.decoder.mid_block}
        mods.update({f"decoder.up.{i}": vae.decoder.up_blocks[n_levels - 1 - i] for i in reversed(range(n_levels))})
        mods["decoder.conv_out"] = vae.decoder.conv_out
        return mods
    mods = {f"encoder.down.{i}": vae.encoder.down_blocks[i] for i in range(n_levels)}
    mods.update({"encoder.mid": vae.encoder.mid_block, "quant_conv": vae.quant_conv})
    return mods


def run_reference(ref, model, inputs, minisd_side, guidance=7.5):
    """The diffusers side on the same inputs as `run_minisd` (the U-Net gets minisd's text embeddings, the encoder
    minisd's decoded image, so each component is compared on identical inputs)."""
    import torch
    s = Side()
    tcfg = model.text_encoder.config
    n_text = tcfg.num_hidden_layers - tcfg.clip_skip
    with torch.no_grad():
        tr = s.traces.setdefault("text encoder", {})
        hs = _hooks(_text_modules(ref["text_encoder"], n_text), tr)
        t0 = time.perf_counter()
        ctx_ref = ref["text_encoder"](torch.from_numpy(np.asarray(inputs["ids"], dtype=np.int64)))[0]
        s.seconds["text encoder"] = time.perf_counter() - t0
        [h.remove() for h in hs]
        x = torch.from_numpy(inputs["x"])
        tr = s.traces.setdefault("U-Net", {})
        hs = _hooks(_unet_modules(ref["unet"], model.unet.config), tr)
        t0 = time.perf_counter()
        ref["unet"](torch.cat([x, x]), inputs["t"], encoder_hidden_states=torch.from_numpy(
            np.asarray(minisd_side.outputs["context"], dtype=np.float32)))
        s.seconds["U-Net"] = time.perf_counter() - t0
        [h.remove() for h in hs]
        n_levels = len(model.vae.config.ch_mult)
        z = x / model.vae.config.scale_factor
        tr = s.traces.setdefault("VAE decode", {})
        hs = _hooks(_vae_modules(ref["vae"], n_levels, "decode"), tr)
        t0 = time.perf_counter()
        ref["vae"].decode(z)
        s.seconds["VAE decode"] = time.perf_counter() - t0
        [h.remove() for h in hs]
        tr = s.traces.setdefault("VAE encode", {})
        hs = _hooks(_vae_modules(ref["vae"], n_levels, "encode"), tr)
        t0 = time.perf_counter()
        ref["vae"].encode(torch.from_numpy(minisd_side.outputs["image_in"]))
        s.seconds["VAE encode"] = time.perf_counter() - t0
        [h.remove() for h in hs]
        if inputs["steps"] > 0:
            t0 = time.perf_counter()
            lat, pix = _reference_sampling(ref, model, inputs, ctx_ref, guidance)
            s.seconds["end to end"] = time.perf_counter() - t0
            s.outputs["latents"], s.outputs["pixels"] = lat, pix
    return s


def _reference_sampling(ref, model, inputs, ctx_ref, guidance):
    """diffusers' StableDiffusionPipeline with DDIM from the model's scheduler config, on the reference text
    embeddings of the same token ids (prompt_embeds), from the same initial latents."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    sched = DDIMScheduler.from_config(model.scheduler.to_dict())
    pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=None, unet=ref["unet"],
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    f = model.vae_scale_factor
    x = torch.from_numpy(inputs["x"])
    kw = dict(prompt_embeds=ctx_ref[1:2], num_inference_steps=inputs["steps"], guidance_scale=guidance,
              latents=x.clone(), height=x.shape[2] * f, width=x.shape[3] * f)
    if guidance > 1:
        kw["negative_prompt_embeds"] = ctx_ref[0:1]
    lat = pipe(output_type="latent", **kw).images
    pix = pipe(output_type="np", **kw).images[0]
    return lat.float().numpy(), np.round(pix * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# comparing and reporting

def compare(a, b, tol=DEFAULT_TOL):
    """{component: [(block, shape, rel_error, max_abs, finite)], ...} and {component: first diverging block}."""
    table, first = {}, {}
    for comp, blocks in a.traces.items():
        rows = []
        ref = b.traces.get(comp, {}) if b is not None else {}
        for name, arr in blocks.items():
            finite = bool(np.all(np.isfinite(arr)))
            if name in ref:
                r = ref[name]
                if r.shape != arr.shape:
                    rows.append((name, arr.shape, float("inf"), float("inf"), finite))
                else:
                    rows.append((name, arr.shape, rel_error(arr, r), float(np.max(np.abs(arr - r))), finite))
            else:
                rows.append((name, arr.shape, None, None, finite))
            err = rows[-1][2]
            if comp not in first and ((err is not None and not err <= tol) or not finite):
                first[comp] = name
        table[comp] = rows
    return table, first


def report(model, a, b, tol=DEFAULT_TOL, how="", out=print):
    """Print the per-block table and a verdict; returns True when everything agrees (or, without a reference,
    when every output is finite)."""
    table, first = compare(a, b, tol)
    if b is None:
        out("reference: torch/diffusers/transformers are not installed, so only minisd's side ran "
            "(pip install torch==2.13.0 diffusers transformers to compare)")
    else:
        out(f"reference: {how}")
    ok = True
    for comp, rows in table.items():
        times = f"minisd {a.seconds.get(comp, 0):.2f} s" + (f", diffusers {b.seconds.get(comp, 0):.2f} s"
                                                             if b is not None else "")
        out(f"\n{comp}  ({times})")
        out(f"  {'block':<22} {'shape':<22} {'rel_error':>10} {'max|diff|':>10}  finite")
        for name, shape, err, mx, finite in rows:
            e = "-" if err is None else f"{err:.2e}"
            m = "-" if mx is None else f"{mx:.2e}"
            out(f"  {name:<22} {str(tuple(shape)):<22} {e:>10} {m:>10}  {'yes' if finite else 'NO'}")
        worst = max((r[2] for r in rows if r[2] is not None), default=None)
        if comp in first:
            ok = False
            err = next(r[2] for r in rows if r[0] == first[comp])
            why = "non-finite values" if err is None or err <= tol else f"rel_error {err:.2e} > {tol:g}"
            out(f"  -> DIVERGES: first at block {first[comp]} ({why})")
        elif worst is not None:
            out(f"  -> agrees (max rel_error {worst:.2e} <= {tol:g})")
        else:
            out("  -> all outputs finite")
    if "latents" in a.outputs:
        line = f"\nend to end: {a.outputs['latents'].shape[0]} image, DDIM (minisd {a.seconds['end to end']:.2f} s"
        if b is not None and "latents" in b.outputs:
            le = rel_error(a.outputs["latents"], b.outputs["latents"])
            px = int(np.max(np.abs(a.outputs["pixels"].astype(int) - b.outputs["pixels"].astype(int))))
            line += (f", diffusers {b.seconds['end to end']:.2f} s): final latents rel_error {le:.2e}, "
                     f"max pixel difference {px}/255")
            if not le <= tol:
                ok = False
                line += "  -> DIVERGES"
        else:
            line += f"): final latents finite: {bool(np.all(np.isfinite(a.outputs['latents'])))}"
        out(line)
    if b is not None:
        if ok:
            out(f"\nverify: minisd and diffusers agree on every block (tolerance {tol:g})")
        else:
            comps = ", ".join(f"{c} first diverges at {n}" for c, n in first.items()) or "the end-to-end run differs"
            out(f"\nverify: DIVERGENCE: {comps}")
    else:
        out(f"\nverify: minisd ran every component{'' if ok else ' but produced non-finite values'} "
            f"(no reference to compare with)")
    return ok


def verify(path, prompt="a photo of an astronaut riding a horse", seed=0, height=None, width=None, steps=2,
           guidance=7.5, tol=DEFAULT_TOL, reference=None, use_reference=True, out=print, model=None):
    """Load `path` in minisd (and the reference, if available) and compare. Returns True if they agree.
    reference: another checkpoint to build the diffusers side from (default: the same path)."""
    from weights_convert.load import load_model

    from .pipeline import check_size, default_size
    if model is None:
        model = load_model(path)
    if height is None or width is None:
        h, w = default_size(model)
        height, width = height or h, width or w
    check_size(model, height, width)
    if model.unet.config.in_channels != model.vae.config.embed_dim:
        raise UserError(f"{path}: inpainting models are not supported by verify")
    out(f"verify {path}: {model.name} ({model.prediction_type}), {height}x{width}, seed {seed}, prompt {prompt!r}")
    inputs = make_inputs(model, prompt, seed, height, width, steps)
    a = run_minisd(model, inputs, guidance)
    b, how = None, ""
    if use_reference and have_reference():
        ref = load_reference(reference or path, model)
        how = ref.pop("how") + (f" ({reference})" if reference else "")
        b = run_reference(ref, model, inputs, a, guidance)
    return report(model, a, b, tol, how, out)

"""What is this checkpoint? Recognise Stable Diffusion 1.x / 2.x single files by their tensor names and shapes,
and name the models minisd does not run (SDXL, SD3, FLUX, ...) so the user gets "unsupported: SDXL", not a
KeyError three modules later.

Only names and shapes are read (a .safetensors header, or the arrays a .ckpt pickle points at), never the values.

The marker keys are those diffusers uses to tell checkpoints apart (`CHECKPOINT_KEY_NAMES` and
`infer_diffusers_model_type` in diffusers' single_file_utils.py):
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/loaders/single_file_utils.py
and sd-reference.md §2.1 / §1.6:
  SD 1.x      model.diffusion_model.output_blocks.11.0.skip_connection.weight  (+ the CLIP-L text encoder)
  SD 2.x      ...input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight with 1024 columns (OpenCLIP-H text)
  inpainting  model.diffusion_model.input_blocks.0.0.weight with 9 input channels (4 latent + 1 mask + 4 masked)
  eps or v    SD 2.x only, and not visible in the weights: diffusers decides `epsilon` if the Lightning
              `global_step` is 875000 (the 512-base model) and `v_prediction` otherwise (768-v); we do the same.

`detect(shapes, global_step)` -> CheckpointInfo, or UserError naming the model family that is not supported.
"""
from dataclasses import dataclass

from minisd.errors import UserError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_HF = "cond_stage_model.transformer."  # SD 1.x: Hugging Face CLIPTextModel names
CLIP_OPENCLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP names
SD2_BASE_GLOBAL_STEP = 875000  # the one number diffusers uses to call an SD 2.x file "epsilon, 512 px"

# (model name, marker keys: any one present identifies it). Checked in this order, before anything else.
UNSUPPORTED = [
    ("SDXL", ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
              "conditioner.embedders.1.model.positional_embedding",
              "model.diffusion_model.label_emb.0.0.weight")),
    ("SDXL refiner", ("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
                      "conditioner.embedders.0.model.text_projection")),
    ("SD3 / SD3.5", ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
                     "joint_blocks.0.context_block.adaLN_modulation.1.bias",
                     "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight")),
    ("FLUX", ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
              "double_blocks.0.img_attn.norm.key_norm.scale")),
    ("Stable Cascade", ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight")),
    ("a ControlNet", ("control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight")),
    ("the SD x4 upscaler", ("model.diffusion_model.input_blocks.10.0.skip_connection.bias",)),
    ("AnimateDiff motion modules",
     ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe",
      "mid_block.motion_modules.0.temporal_transformer.norm.bias")),
    ("Playground v2.5", ("edm_mean",)),
]


@dataclass(frozen=True)
class CheckpointInfo:
    """What detect() found. family: "sd1" | "sd2"; variant: "txt2img" | "inpainting";
    prediction_type: "epsilon" | "v_prediction" (diffusers' rule for SD 2.x); sample_size: default latent size
    (64 = 512 px, 96 = 768 px); has_ema: the file also holds `model_ema.*` shadow weights."""
    family: str
    variant: str
    prediction_type: str
    sample_size: int
    has_ema: bool
    text_layout: str  # "hf" (SD 1.x) | "openclip" (SD 2.x)

    @property
    def name(self):
        base = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}[self.family]
        extra = " inpainting" if self.variant == "inpainting" else ""
        pred = ", v-prediction" if self.prediction_type == "v_prediction" else ""
        return f"{base}{extra}{pred}"


def has_ema(keys):
    """diffusers' rule: a file "has EMA" when more than 100 keys start with model_ema."""
    return sum(1 for k in keys if k.startswith("model_ema.")) > 100


def unsupported_name(keys):
    """The name of a model family minisd does not run, if `keys` belong to one, else None."""
    keys = set(keys)
    for name, markers in UNSUPPORTED:
        if any(m in keys for m in markers):
            return name
    return None


def what_else(keys):
    """A best guess at what a file without the SD prefixes is, for the error message."""
    keys = list(keys)
    ks = set(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        return "a LoRA (low-rank weight deltas), not a full model"
    if "string_to_param" in ks or "emb_params" in ks or (len(keys) <= 4 and any(k.startswith("<") for k in keys)):
        return "a textual-inversion embedding, not a full model"
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in keys):
        return ("one component of a diffusers folder (a U-Net); pass the folder that holds unet/, vae/, "
                "text_encoder/ instead")
    if "encoder.conv_in.weight" in ks and "decoder.conv_out.weight" in ks:
        return "a standalone VAE, not a full model"
    if any(k.startswith("text_model.") for k in keys):
        return "a standalone text encoder, not a full model"
    return None


def detect(shapes, global_step=None, what="checkpoint"):
    """shapes: {key: shape} of an LDM single-file state dict (EMA keys may be present). global_step: the
    Lightning checkpoint's `global_step` when the file has one. Returns CheckpointInfo or raises UserError."""
    keys = list(shapes)
    other = unsupported_name(keys)
    if other is not None:
        raise UserError(f"{what}: unsupported: {other}. minisd runs Stable Diffusion 1.x and 2.x only")
    has_unet = any(k.startswith(UNET) for k in keys)
    has_vae = any(k.startswith(VAE) for k in keys)
    hf = any(k.startswith(CLIP_HF) for k in keys)
    oc = any(k.startswith(CLIP_OPENCLIP) for k in keys)
    if not has_unet:
        guess = what_else(keys)
        if guess:
            raise UserError(f"{what}: this looks like {guess}")
        raise UserError(f"{what}: not a Stable Diffusion checkpoint (no 'model.diffusion_model.*' U-Net weights "
                        f"among its {len(keys)} tensors; first few: {keys[:3]})")
    missing = [n for n, ok in (("VAE (first_stage_model.*)", has_vae),
                               ("text encoder (cond_stage_model.*)", hf or oc)) if not ok]
    if missing:
        raise UserError(f"{what}: has a U-Net but no {' and no '.join(missing)}; minisd needs a full SD checkpoint "
                        f"(U-Net + VAE + text encoder in one file, or a diffusers folder)")
    if hf and oc:
        raise UserError(f"{what}: holds both a CLIP-L (SD 1.x) and an OpenCLIP (SD 2.x) text encoder; "
                        f"cannot tell which model this is")
    in_key = UNET + "input_blocks.0.0.weight"
    if in_key not in shapes:
        raise UserError(f"{what}: the U-Net has no {in_key}; is this a Stable Diffusion checkpoint?")
    cin = shapes[in_key][1]
    if cin == 9:
        variant = "inpainting"
    elif cin == 8:
        raise UserError(f"{what}: unsupported: InstructPix2Pix (8 input channels)")
    else:
        variant = "txt2img"
    family = "sd2" if oc else "sd1"
    k2 = UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    if family == "sd1" and k2 in shapes and shapes[k2][-1] == 1024:
        family = "sd2"  # an SD 2.x U-Net paired with a text encoder in CLIP-L layout (rare; diffusers' rule)
    prediction, size = "epsilon", 64
    if family == "sd2" and variant == "txt2img":
        step = None if global_step is None else int(global_step)
        if step != SD2_BASE_GLOBAL_STEP:
            prediction, size = "v_prediction", 96
    return CheckpointInfo(family, variant, prediction, size, has_ema(keys), "openclip" if oc else "hf")


def detect_diffusers_pipeline(model_index, folder="folder"):
    """Refuse diffusers pipelines minisd does not run, by model_index.json's `_class_name`."""
    cls = str(model_index.get("_class_name", ""))
    table = [("XL", "SDXL"), ("StableDiffusion3", "SD3 / SD3.5"), ("Flux", "FLUX"), ("StableCascade", "Stable Cascade"),
             ("Kandinsky", "Kandinsky"), ("PixArt", "PixArt"), ("Upscale", "the SD x4 upscaler"),
             ("ControlNet", "a ControlNet pipeline"), ("Video", "a video model"), ("AnimateDiff", "AnimateDiff")]
    for marker, name in table:
        if marker.lower() in cls.lower():
            raise UserError(f"{folder}: unsupported: {name} ({cls}). minisd runs Stable Diffusion 1.x and 2.x only")
    return cls

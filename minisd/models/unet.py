"""The Stable Diffusion U-Net (LDM's `UNetModel`), forward and hand-written backward, SD 1.x and 2.x.

Architecture and parameter names follow the original CompVis/Stability code exactly, so an SD single-file
checkpoint loads with no renaming:
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/diffusionmodules/openaimodel.py (UNetModel)
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/attention.py (SpatialTransformer)
  https://github.com/Stability-AI/stablediffusion/blob/cf1d67a6/ldm/modules/attention.py (SD2: linear proj_in/out)
Exact layer semantics (eps values, GEGLU order, [cos, sin] timestep order) are collected with sources in
../shared/docs/sd-reference.md §1.2.

Shapes: x (N, Cin, H, W) latents (or pixels for small models), t (N,) timesteps (may be fractional),
context (N, S, context_dim) text embeddings, y (N,) class labels -> eps/v prediction (N, Cout, H, W).
Inside: emb (N, E) with E = 4*model_channels is the timestep(+class) embedding every ResBlock receives.

Block plan (SD 1.5 at 64x64 latents):
  input_blocks.0   conv 4->320                                   64x64   (pushed to the skip stack)
  input_blocks.1,2 ResBlock + SpatialTransformer(8 heads x 40)   64x64
  input_blocks.3   Downsample (3x3 conv, stride 2)               -> 32x32
  ... 640 at 32x32, 1280 at 16x16, 1280 at 8x8 (no attention at the lowest level)
  middle_block     ResBlock, SpatialTransformer, ResBlock
  output_blocks.i  concat [h, skip] (h first) -> ResBlock (+ ST) (+ Upsample), 12 blocks in 4 levels
  out              GroupNorm -> SiLU -> conv 320->4
"""
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import numpy as np

from ..backend import to_numpy, xp_of
from ..nn import Params, init_params
from ..ops.activations import geglu_backward, geglu_forward, silu_backward, silu_forward
from ..ops.attention import attention_backward, attention_forward
from ..ops.conv import (concat_backward, concat_forward, upsample_nearest2x_backward,
                        upsample_nearest2x_forward)
from ..ops.linear import embedding_backward, embedding_forward
from ..ops.timestep import timestep_embedding
from .common import (check_finite, conv, conv_backward, group_norm, group_norm_backward_named, layer_norm,
                     layer_norm_backward_named, linear, linear_backward_named)

PREFIX = "model.diffusion_model."  # LDM key prefix of the U-Net inside a full SD checkpoint

RES_EPS = 1e-5  # GroupNorm32 in ResBlocks and `out`: PyTorch's default eps
ST_EPS = 1e-6  # the SpatialTransformer's own GroupNorm (attention.py Normalize) uses 1e-6
LN_EPS = 1e-5  # every LayerNorm in the transformer blocks


@dataclass(frozen=True)
class UNetConfig:
    """U-Net hyper-parameters, named as in LDM's yaml (`unet_config.params`)."""
    in_channels: int = 4  # e.g. 4 (SD latents), 9 (SD inpainting), 1 (MNIST pixels)
    out_channels: int = 4  # e.g. 4
    model_channels: int = 320  # e.g. 320 (SD), 32 (tiny)
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors that get a SpatialTransformer, e.g. (4, 2, 1)
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up), e.g. 2
    channel_mult: tuple = (1, 2, 4, 4)  # channels per level = model_channels * mult, e.g. (1, 2, 4, 4)
    num_heads: int = 8  # attention heads (SD1: 8); -1 when num_head_channels sets the head width instead
    num_head_channels: int = -1  # width of one head (SD2: 64 -> 5/10/20 heads); -1 when num_heads is used
    transformer_depth: int = 1  # BasicTransformerBlocks per SpatialTransformer, e.g. 1
    context_dim: Optional[int] = 768  # cross-attention width (SD1 768, SD2 1024); None: attn2 attends to the image
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear [c, c] instead of 1x1 conv
    num_classes: Optional[int] = None  # class-conditional models add label_emb (num_classes, 4*model_channels)
    norm_num_groups: int = 32  # LDM hard-codes GroupNorm32; tiny models need fewer groups (diffusers' name)
    dropout: float = 0.0  # ResBlock dropout (SD: 0; DDPM CIFAR-10 used 0.1)

    def __post_init__(self):
        # stored largest first, as the yaml writes [4, 2, 1], so equal configs compare equal
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            if ch % self.norm_num_groups:
                raise ValueError(f"UNetConfig: level {level} has {ch} channels, not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("UNetConfig: set exactly one of num_heads (SD1: 8) and num_head_channels (SD2: 64)")

    def heads(self, ch):
        """(heads, head width) of a SpatialTransformer on `ch` channels (LDM: legacy=False)."""
        if self.num_head_channels == -1:
            if ch % self.num_heads:
                raise ValueError(f"UNetConfig: {ch} channels do not split into num_heads={self.num_heads}")
            return self.num_heads, ch // self.num_heads
        if ch % self.num_head_channels:
            raise ValueError(f"UNetConfig: {ch} channels do not split into heads of {self.num_head_channels}")
        return ch // self.num_head_channels, self.num_head_channels

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels

    @property
    def downsample_factor(self):
        """H and W must be multiples of this (one stride-2 conv per level but the last)."""
        return 2 ** (len(self.channel_mult) - 1)


SD15 = UNetConfig()
SD21 = UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SD21_768V = SD21  # the 768-v U-Net has the same shape; only the prediction type (v) and image size differ
# Tiny presets: tests (seconds on a CPU) and MNIST/CIFAR-scale training.
TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                  num_heads=2, context_dim=12, norm_num_groups=4)
TINY_MNIST_LATENT = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2),
                               attention_resolutions=(1, 2), num_res_blocks=1, num_heads=4, context_dim=64,
                               norm_num_groups=16)
MNIST_PIXEL_CLASS = UNetConfig(in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2, 2),
                               attention_resolutions=(4,), num_res_blocks=1, num_heads=4, context_dim=None,
                               num_classes=10, norm_num_groups=8)
CIFAR_PIXEL = UNetConfig(in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                         attention_resolutions=(2,), num_res_blocks=2, num_heads=4, context_dim=None,
                         norm_num_groups=32, dropout=0.1)
PRESETS = {"SD15": SD15, "SD21": SD21, "SD21_768V": SD21_768V, "TINY": TINY,
           "TINY_MNIST_LATENT": TINY_MNIST_LATENT, "MNIST_PIXEL_CLASS": MNIST_PIXEL_CLASS,
           "CIFAR_PIXEL": CIFAR_PIXEL}


# ----------------------------------------------------------------------------------------------------------------
# the block plan: one entry per layer, derived from the config exactly as UNetModel.__init__ builds its ModuleLists

class Layer(NamedTuple):
    kind: str  # "conv" | "res" | "st" | "down" | "up"
    name: str  # key prefix without the model prefix, e.g. "input_blocks.1.0"
    cin: int
    cout: int
    heads: int = 0  # SpatialTransformer only
    dhead: int = 0


class Plan(NamedTuple):
    input_blocks: list  # list of lists of Layer; each block's output is pushed to the skip stack
    middle: list
    output_blocks: list  # each block first concatenates [h, skip]


def build_plan(cfg):
    mc = cfg.model_channels
    inp = [[Layer("conv", "input_blocks.0.0", cfg.in_channels, mc)]]
    skip_ch = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            i = len(inp)
            block = [Layer("res", f"input_blocks.{i}.0", ch, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                block.append(Layer("st", f"input_blocks.{i}.1", ch, ch, *cfg.heads(ch)))
            inp.append(block)
            skip_ch.append(ch)
        if level != len(cfg.channel_mult) - 1:
            inp.append([Layer("down", f"input_blocks.{len(inp)}.0", ch, ch)])
            skip_ch.append(ch)
            ds *= 2
    mid = [Layer("res", "middle_block.0", ch, ch), Layer("st", "middle_block.1", ch, ch, *cfg.heads(ch)),
           Layer("res", "middle_block.2", ch, ch)]
    out = []
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            j = len(out)
            block = [Layer("res", f"output_blocks.{j}.0", ch + skip_ch.pop(), mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                block.append(Layer("st", f"output_blocks.{j}.1", ch, ch, *cfg.heads(ch)))
            if level and i == cfg.num_res_blocks:
                block.append(Layer("up", f"output_blocks.{j}.{len(block)}", ch, ch))
                ds //= 2
            out.append(block)
    return Plan(inp, mid, out)


def param_shapes(cfg, prefix=PREFIX):
    """{checkpoint key: shape} of every U-Net parameter, in LDM's order."""
    mc, E = cfg.model_channels, cfg.time_embed_dim
    s = {"time_embed.0.weight": (E, mc), "time_embed.0.bias": (E,),  # time_embed.1 is SiLU (no weights)
         "time_embed.2.weight": (E, E), "time_embed.2.bias": (E,)}
    if cfg.num_classes is not None:
        s["label_emb.weight"] = (cfg.num_classes, E)
    plan = build_plan(cfg)
    for L in [layer for block in plan.input_blocks for layer in block] + plan.middle + \
             [layer for block in plan.output_blocks for layer in block]:
        n = L.name
        if L.kind == "conv":
            s.update({f"{n}.weight": (L.cout, L.cin, 3, 3), f"{n}.bias": (L.cout,)})
        elif L.kind == "down":
            s.update({f"{n}.op.weight": (L.cout, L.cin, 3, 3), f"{n}.op.bias": (L.cout,)})
        elif L.kind == "up":
            s.update({f"{n}.conv.weight": (L.cout, L.cin, 3, 3), f"{n}.conv.bias": (L.cout,)})
        elif L.kind == "res":
            s.update({f"{n}.in_layers.0.weight": (L.cin,), f"{n}.in_layers.0.bias": (L.cin,),
                      f"{n}.in_layers.2.weight": (L.cout, L.cin, 3, 3), f"{n}.in_layers.2.bias": (L.cout,),
                      f"{n}.emb_layers.1.weight": (L.cout, E), f"{n}.emb_layers.1.bias": (L.cout,),
                      f"{n}.out_layers.0.weight": (L.cout,), f"{n}.out_layers.0.bias": (L.cout,),
                      f"{n}.out_layers.3.weight": (L.cout, L.cout, 3, 3), f"{n}.out_layers.3.bias": (L.cout,)})
            if L.cin != L.cout:
                s.update({f"{n}.skip_connection.weight": (L.cout, L.cin, 1, 1),
                          f"{n}.skip_connection.bias": (L.cout,)})
        elif L.kind == "st":
            c, inner = L.cin, L.heads * L.dhead
            ctx = cfg.context_dim if cfg.context_dim is not None else c
            proj_in = (inner, c) if cfg.use_linear_in_transformer else (inner, c, 1, 1)
            proj_out = (c, inner) if cfg.use_linear_in_transformer else (c, inner, 1, 1)
            s.update({f"{n}.norm.weight": (c,), f"{n}.norm.bias": (c,),
                      f"{n}.proj_in.weight": proj_in, f"{n}.proj_in.bias": (inner,)})
            for d in range(cfg.transformer_depth):
                b = f"{n}.transformer_blocks.{d}"
                s.update({f"{b}.attn1.to_q.weight": (inner, inner), f"{b}.attn1.to_k.weight": (inner, inner),
                          f"{b}.attn1.to_v.weight": (inner, inner), f"{b}.attn1.to_out.0.weight": (inner, inner),
                          f"{b}.attn1.to_out.0.bias": (inner,),
                          f"{b}.attn2.to_q.weight": (inner, inner), f"{b}.attn2.to_k.weight": (inner, ctx),
                          f"{b}.attn2.to_v.weight": (inner, ctx), f"{b}.attn2.to_out.0.weight": (inner, inner),
                          f"{b}.attn2.to_out.0.bias": (inner,),
                          # GEGLU: one Linear to 2 x 4*inner (value half, then gate half), back to inner
                          f"{b}.ff.net.0.proj.weight": (8 * inner, inner), f"{b}.ff.net.0.proj.bias": (8 * inner,),
                          f"{b}.ff.net.2.weight": (inner, 4 * inner), f"{b}.ff.net.2.bias": (inner,),
                          f"{b}.norm1.weight": (inner,), f"{b}.norm1.bias": (inner,),
                          f"{b}.norm2.weight": (inner,), f"{b}.norm2.bias": (inner,),
                          f"{b}.norm3.weight": (inner,), f"{b}.norm3.bias": (inner,)})
            s.update({f"{n}.proj_out.weight": proj_out, f"{n}.proj_out.bias": (c,)})
    s.update({"out.0.weight": (mc,), "out.0.bias": (mc,),  # out.1 is SiLU (no weights)
              "out.2.weight": (cfg.out_channels, mc, 3, 3), "out.2.bias": (cfg.out_channels,)})
    return {prefix + k: v for k, v in s.items()}


# ----------------------------------------------------------------------------------------------------------------
# blocks. Each returns (y, cache); its backward returns input gradients and hands parameter gradients to P.

def resblock_forward(P, n, x, emb, groups, dropout=0.0, rng=None):
    """ResBlock (use_scale_shift_norm=False): x (N, Cin, H, W), emb (N, E) -> (N, Cout, H, W)."""
    h, c_n1 = group_norm(P, n + "in_layers.0", x, groups, RES_EPS, act="silu")  # in_layers.1 is the SiLU, fused
    h, c_c1 = conv(P, n + "in_layers.2", h)
    e, c_es = silu_forward(emb)  # emb_layers.0 is SiLU (no weights)
    e, c_el = linear(P, n + "emb_layers.1", e)  # (N, Cout)
    h = h + e[:, :, None, None]  # the timestep conditions every pixel of every channel
    h, c_n2 = group_norm(P, n + "out_layers.0", h, groups, RES_EPS, act="silu")  # out_layers.1 is the SiLU
    mask = None
    if dropout > 0.0 and rng is not None:  # out_layers.2 is Dropout: only when training (an rng is given)
        mask = xp_of(h).asarray((rng.random(h.shape) >= dropout).astype(h.dtype) / (1.0 - dropout))  # host rng
        h = h * mask
    h, c_c2 = conv(P, n + "out_layers.3", h)
    c_skip = None
    if n + "skip_connection.weight" in P:  # 1x1 conv when Cin != Cout, else identity
        s, c_skip = conv(P, n + "skip_connection", x, padding=0)
    else:
        s = x
    return s + h, (c_n1, c_c1, c_es, c_el, c_n2, mask, c_c2, c_skip)


def resblock_backward(P, n, dy, cache):
    """dy (N, Cout, H, W) -> (dx (N, Cin, H, W), demb (N, E))."""
    c_n1, c_c1, c_es, c_el, c_n2, mask, c_c2, c_skip = cache
    dh = conv_backward(P, n + "out_layers.3", dy, c_c2)  # y = skip(x) + h, so h and the skip both get dy
    if mask is not None:
        dh = dh * mask
    dh = group_norm_backward_named(P, n + "out_layers.0", dh, c_n2)
    de = dh.sum(axis=(2, 3))  # h + e[:, :, None, None] broadcast over H, W -> sum them back
    de = linear_backward_named(P, n + "emb_layers.1", de, c_el)
    demb = silu_backward(de, c_es)
    dh = conv_backward(P, n + "in_layers.2", dh, c_c1)
    dx = group_norm_backward_named(P, n + "in_layers.0", dh, c_n1)
    if c_skip is not None:
        dx += conv_backward(P, n + "skip_connection", dy, c_skip)
    else:
        dx += dy
    return dx, demb


def attention_layer_forward(P, n, x, ctx, heads):
    """LDM CrossAttention: x (N, L, D) queries, ctx (N, S, Dc) keys/values -> (N, L, D).
    to_q/to_k/to_v have no bias; to_out.0 has one (to_out.1 is Dropout(0))."""
    q, c_q = linear(P, n + "to_q", x)
    k, c_k = linear(P, n + "to_k", ctx)
    v, c_v = linear(P, n + "to_v", ctx)
    o, c_a = attention_forward(q, k, v, heads)  # scale d**-0.5, softmax over keys, memory bounded
    y, c_o = linear(P, n + "to_out.0", o)
    return y, (c_q, c_k, c_v, c_a, c_o)


def attention_layer_backward(P, n, dy, cache):
    """-> (dx (N, L, D), dctx (N, S, Dc)): the query path and the key/value path separately."""
    c_q, c_k, c_v, c_a, c_o = cache
    do = linear_backward_named(P, n + "to_out.0", dy, c_o)
    dq, dk, dv = attention_backward(do, c_a)
    dx = linear_backward_named(P, n + "to_q", dq, c_q)
    dctx = linear_backward_named(P, n + "to_k", dk, c_k)
    dctx += linear_backward_named(P, n + "to_v", dv, c_v)
    return dx, dctx


def transformer_block_forward(P, n, x, context, heads):
    """BasicTransformerBlock (pre-LN): self-attention, cross-attention, GEGLU feed-forward, each residual.
    x (N, L, D), context (N, S, Dc) or None (then attn2 attends to x itself, as LDM does)."""
    h, c_n1 = layer_norm(P, n + "norm1", x, LN_EPS)
    a, c_a1 = attention_layer_forward(P, n + "attn1.", h, h, heads)
    x = x + a
    h, c_n2 = layer_norm(P, n + "norm2", x, LN_EPS)
    a, c_a2 = attention_layer_forward(P, n + "attn2.", h, h if context is None else context, heads)
    x = x + a
    h, c_n3 = layer_norm(P, n + "norm3", x, LN_EPS)
    f, c_f1 = linear(P, n + "ff.net.0.proj", h)  # (N, L, 8D): value half first, gate half second
    f, c_g = geglu_forward(f)  # (N, L, 4D) = value * gelu_exact(gate)
    f, c_f2 = linear(P, n + "ff.net.2", f)  # ff.net.1 is Dropout(0)
    return x + f, (c_n1, c_a1, c_n2, c_a2, c_n3, c_f1, c_g, c_f2, context is None)


def transformer_block_backward(P, n, dy, cache):
    """dy (N, L, D) -> (dx, dcontext or None)."""
    c_n1, c_a1, c_n2, c_a2, c_n3, c_f1, c_g, c_f2, self_only = cache
    dx = dy.copy()  # residual path; the branches below add into it
    df = linear_backward_named(P, n + "ff.net.2", dy, c_f2)
    df = geglu_backward(df, c_g)
    df = linear_backward_named(P, n + "ff.net.0.proj", df, c_f1)
    dx += layer_norm_backward_named(P, n + "norm3", df, c_n3)
    dh, dctx = attention_layer_backward(P, n + "attn2.", dx, c_a2)
    if self_only:
        dh += dctx
        dctx = None
    dx += layer_norm_backward_named(P, n + "norm2", dh, c_n2)
    dh, dkv = attention_layer_backward(P, n + "attn1.", dx, c_a1)
    dh += dkv  # self-attention: keys and values come from the same normalised tokens as the queries
    dx += layer_norm_backward_named(P, n + "norm1", dh, c_n1)
    return dx, dctx


def spatial_transformer_forward(P, n, x, context, heads, depth, groups):
    """SpatialTransformer: x (N, C, H, W) -> (N, C, H, W) = x + proj_out(blocks(proj_in(norm(x)) as tokens)).

    SD1 stores proj_in/proj_out as 1x1 convs applied before/after the reshape to tokens, SD2 as Linear applied
    on tokens; both are the same per-token linear map, so both run as a linear on tokens here.
    """
    N, C, H, W = x.shape
    h, c_norm = group_norm(P, n + "norm", x, groups, ST_EPS)  # eps 1e-6 here (LDM Normalize), not 1e-5
    tok = h.transpose(0, 2, 3, 1).reshape(N, H * W, C)  # (N, L, C) tokens, L = H*W in row-major pixel order
    tok, c_in = linear(P, n + "proj_in", tok)  # (N, L, inner)
    c_blocks = []
    for d in range(depth):
        tok, c = transformer_block_forward(P, f"{n}transformer_blocks.{d}.", tok, context, heads)
        c_blocks.append(c)
    tok, c_out = linear(P, n + "proj_out", tok)  # (N, L, C)
    y = tok.reshape(N, H, W, C).transpose(0, 3, 1, 2) + x  # back to (N, C, H, W), plus the residual
    return y, (c_norm, c_in, c_blocks, c_out, (N, C, H, W))


def spatial_transformer_backward(P, n, dy, cache):
    """dy (N, C, H, W) -> (dx (N, C, H, W), dcontext (N, S, Dc) or None)."""
    c_norm, c_in, c_blocks, c_out, (N, C, H, W) = cache
    dtok = dy.transpose(0, 2, 3, 1).reshape(N, H * W, C)  # (N, L, C)
    dtok = linear_backward_named(P, n + "proj_out", dtok, c_out)
    dctx = None
    for d in reversed(range(len(c_blocks))):  # reverse order of forward
        dtok, dc = transformer_block_backward(P, f"{n}transformer_blocks.{d}.", dtok, c_blocks[d])
        if dc is not None:
            dctx = dc if dctx is None else dctx + dc
    dtok = linear_backward_named(P, n + "proj_in", dtok, c_in)
    dh = dtok.reshape(N, H, W, C).transpose(0, 3, 1, 2)  # (N, C, H, W)
    dx = group_norm_backward_named(P, n + "norm", dh, c_norm)
    dx += dy  # residual
    return dx, dctx


# ----------------------------------------------------------------------------------------------------------------
# the model

class UNetCache(NamedTuple):
    c_te0: tuple
    c_te1: tuple
    c_te2: tuple
    c_label: Optional[tuple]
    layers: list  # one cache per Layer, in forward order (input blocks, middle, output blocks)
    concats: list  # one cache per output block's skip concatenation
    c_outnorm: tuple
    c_outconv: tuple
    shapes: tuple  # (x shape, context shape or None)


class UNet:
    """The U-Net: `params` (an nn.Params keyed by LDM names) and `config`. No other state.

    forward(x, t, context, y) -> (out, cache); backward(dout, cache) -> (dx, dcontext) and parameter gradients in
    params.grads. Pass keep_cache=True to forward when a backward will follow (training); inference keeps none.
    """

    def __init__(self, config=SD15, params=None, rng=None, dtype=np.float32, prefix=PREFIX):
        self.config, self.prefix = config, prefix
        self.plan = build_plan(config)
        shapes = param_shapes(config, prefix)
        if params is None:
            rng = np.random.default_rng(0) if rng is None else rng
            # SD zero-initialises the last conv of every ResBlock, proj_out and the output conv
            # (zero_module in openaimodel.py / attention.py) so each block starts as the identity.
            zero = (".out_layers.3.weight", ".out_layers.3.bias", ".proj_out.weight", ".proj_out.bias",
                    prefix + "out.2.weight", prefix + "out.2.bias")
            tensors = init_params(shapes, rng, dtype, zero=zero)
            if config.num_classes is not None:  # nn.Embedding's default N(0, 1), as PyTorch initialises label_emb
                tensors[prefix + "label_emb.weight"] = rng.standard_normal(
                    shapes[prefix + "label_emb.weight"]).astype(dtype)
            params = Params(tensors, compute_dtype=dtype)
        else:
            got = params.shapes()
            if got != shapes:
                Params({k: np.empty(0) for k in shapes}).load_state_dict(
                    {k: np.empty(v) for k, v in got.items()})  # raises with the missing/unexpected/shape listing
        self.params = params

    @classmethod
    def from_weights(cls, params, prefix=PREFIX, **overrides):
        """Build a U-Net around loaded weights, inferring the config from their shapes (see config_from_shapes)."""
        return cls(config_from_shapes(params.shapes(), prefix, **overrides), params=params, prefix=prefix)

    def num_parameters(self):
        return self.params.num_parameters()

    # -------------------------------------------------------------------------------------------------- forward
    def _check_inputs(self, x, t, context, y):
        cfg, f = self.config, self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet: x must be (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"UNet: latent height and width must be multiples of {f} (images: multiples of "
                             f"{8 * f} pixels for SD), got {x.shape[2]}x{x.shape[3]}")
        check_finite("UNet", x)
        N = x.shape[0]
        if np.ndim(t) not in (0, 1) or (np.ndim(t) == 1 and len(t) != N):
            raise ValueError(f"UNet: t must be a scalar or shape ({N},), got shape {np.shape(t)}")
        if cfg.context_dim is not None:
            if context is None:
                raise ValueError(f"UNet: this model cross-attends to text: pass context of shape "
                                 f"(N, S, {cfg.context_dim})")
            if context.ndim != 3 or context.shape[0] != N or context.shape[2] != cfg.context_dim:
                raise ValueError(f"UNet: context must be ({N}, S, {cfg.context_dim}), got {tuple(context.shape)}"
                                 f" (SD1 text encoders give width 768, SD2 1024)")
        elif context is not None:
            raise ValueError("UNet: this model has no cross-attention (context_dim=None); pass context=None")
        if cfg.num_classes is not None:
            if y is None or np.shape(y) != (N,):
                raise ValueError(f"UNet: class-conditional model: pass integer labels y of shape ({N},)")
        elif y is not None:
            raise ValueError("UNet: this model is not class-conditional (num_classes=None); pass y=None")

    def forward(self, x, t, context=None, y=None, keep_cache=False, rng=None, trace=None):
        """x (N, Cin, H, W), t scalar or (N,), context (N, S, Dc) or None, y (N,) int or None -> (N, Cout, H, W).
        rng: only for dropout while training (None disables dropout).
        trace: optional callback trace(name, array) called with each block's output ("time_embed",
        "input_blocks.3", "middle_block", "output_blocks.11", "out"); `minisd verify` uses it to find the first
        block where two implementations diverge."""
        self._check_inputs(x, t, context, y)
        P, cfg, p = self.params, self.config, self.prefix
        G, N = cfg.norm_num_groups, x.shape[0]
        xp = xp_of(x)  # numpy or cupy: the timestep embedding is computed on the host and moved to x's device
        t = np.broadcast_to(np.asarray(to_numpy(t), dtype=np.float64), (N,))
        temb = xp.asarray(timestep_embedding(t, cfg.model_channels).astype(x.dtype))  # (N, mc), [cos, sin]
        h, c_te0 = linear(P, p + "time_embed.0", temb)
        h, c_te1 = silu_forward(h)  # time_embed.1 is SiLU
        emb, c_te2 = linear(P, p + "time_embed.2", h)  # (N, E)
        c_label = None
        if cfg.num_classes is not None:
            e, c_label = embedding_forward(np.asarray(y), P[p + "label_emb.weight"])
            emb = emb + e
        trace and trace("time_embed", emb)
        keep = [] if keep_cache else None
        hs = []  # the skip stack
        h = x
        for i, block in enumerate(self.plan.input_blocks):
            for L in block:
                h, c = self._layer_forward(L, h, emb, context, rng)
                keep is not None and keep.append(c)
            hs.append(h)
            trace and trace(f"input_blocks.{i}", h)
        for L in self.plan.middle:
            h, c = self._layer_forward(L, h, emb, context, rng)
            keep is not None and keep.append(c)
        trace and trace("middle_block", h)
        concats = [] if keep_cache else None
        for i, block in enumerate(self.plan.output_blocks):
            h, c = concat_forward([h, hs.pop()], axis=1)  # [h, skip]: h first, as LDM's th.cat([h, hs.pop()])
            concats is not None and concats.append(c)
            for L in block:
                h, c = self._layer_forward(L, h, emb, context, rng)
                keep is not None and keep.append(c)
            trace and trace(f"output_blocks.{i}", h)
        h, c_on = group_norm(P, p + "out.0", h, G, RES_EPS, act="silu")  # out.1 is SiLU, fused
        out, c_oc = conv(P, p + "out.2", h)
        trace and trace("out", out)
        if not keep_cache:
            return out, None
        shapes = (x.shape, None if context is None else context.shape)
        return out, UNetCache(c_te0, c_te1, c_te2, c_label, keep, concats, c_on, c_oc, shapes)

    def _layer_forward(self, L, h, emb, context, rng):
        P, cfg, n = self.params, self.config, self.prefix + L.name + "."
        if L.kind == "conv":
            return conv(P, n[:-1], h)
        if L.kind == "res":
            return resblock_forward(P, n, h, emb, cfg.norm_num_groups, cfg.dropout, rng)
        if L.kind == "st":
            return spatial_transformer_forward(P, n, h, context, L.heads, cfg.transformer_depth,
                                               cfg.norm_num_groups)
        if L.kind == "down":
            return conv(P, n + "op", h, stride=2, padding=1)  # symmetric padding here (the VAE pads right/bottom)
        u, c_up = upsample_nearest2x_forward(h)  # "up": nearest x2, then a 3x3 conv
        y, c_conv = conv(P, n + "conv", u)
        return y, (c_up, c_conv)

    # ------------------------------------------------------------------------------------------------- backward
    def backward(self, dout, cache):
        """dout (N, Cout, H, W) -> (dx (N, Cin, H, W), dcontext (N, S, Dc) or None). Parameter gradients go to
        self.params.grads (added to what is there: call params.zero_grad() between steps)."""
        if cache is None:
            raise ValueError("UNet.backward: forward was run with keep_cache=False; run it with keep_cache=True")
        P, cfg, p = self.params, self.config, self.prefix
        x_shape, ctx_shape = cache.shapes
        dh = conv_backward(P, p + "out.2", dout, cache.c_outconv)
        dh = group_norm_backward_named(P, p + "out.0", dh, cache.c_outnorm)
        xp = xp_of(dout)  # numpy or cupy: the accumulators live where the gradients are
        demb = xp.zeros((x_shape[0], cfg.time_embed_dim), dtype=dout.dtype)
        dctx = None if ctx_shape is None else xp.zeros(ctx_shape, dtype=dout.dtype)
        layers = list(cache.layers)  # popped from the end: reverse order of forward
        dskips = []  # gradients of the skip stack, filled from the first pushed entry to the last
        for block, c_cat in zip(reversed(self.plan.output_blocks), reversed(cache.concats)):
            for L in reversed(block):
                dh = self._layer_backward(L, dh, layers.pop(), demb, dctx)
            dh, dskip = concat_backward(dh, c_cat)
            dskips.append(dskip)
        for L in reversed(self.plan.middle):
            dh = self._layer_backward(L, dh, layers.pop(), demb, dctx)
        for j in reversed(range(len(self.plan.input_blocks))):
            dh = dh + dskips[j]  # block j's output fed the next block *and* the skip stack
            for L in reversed(self.plan.input_blocks[j]):
                dh = self._layer_backward(L, dh, layers.pop(), demb, dctx)
        # the timestep MLP (and the class embedding) receive the sum of every ResBlock's demb
        if cache.c_label is not None:
            P.add_grad(p + "label_emb.weight", embedding_backward(demb, cache.c_label))
        d = linear_backward_named(P, p + "time_embed.2", demb, cache.c_te2)
        d = silu_backward(d, cache.c_te1)
        linear_backward_named(P, p + "time_embed.0", d, cache.c_te0)  # no gradient w.r.t. t
        return dh, dctx

    def _layer_backward(self, L, dh, c, demb, dctx):
        """Backward of one layer; adds into demb and dctx in place; returns the input gradient."""
        P, n = self.params, self.prefix + L.name + "."
        if L.kind == "conv":
            return conv_backward(P, n[:-1], dh, c)
        if L.kind == "res":
            dx, de = resblock_backward(P, n, dh, c)
            demb += de
            return dx
        if L.kind == "st":
            dx, dc = spatial_transformer_backward(P, n, dh, c)
            if dc is not None:
                dctx += dc
            return dx
        if L.kind == "down":
            return conv_backward(P, n + "op", dh, c)
        c_up, c_conv = c
        return upsample_nearest2x_backward(conv_backward(P, n + "conv", dh, c_conv), c_up)


# ----------------------------------------------------------------------------------------------------------------
# config from weights

_UNSET = object()


def config_from_shapes(shapes, prefix=PREFIX, num_heads=None, num_head_channels=None, norm_num_groups=None,
                       context_dim_override=_UNSET):
    """Infer a UNetConfig from parameter shapes alone, then check every shape against it.

    Head counts are not visible in shapes; as diffusers' converter does, a 1024-wide context (SD2) means heads of
    64 channels, otherwise 8 heads (SD1). Pass num_heads/num_head_channels to override (tiny models).
    """
    def get(k):
        if prefix + k not in shapes:
            raise ValueError(f"U-Net weights: missing {prefix + k}; is this a Stable Diffusion U-Net?")
        return shapes[prefix + k]

    mc, cin = get("input_blocks.0.0.weight")[:2]
    cout = get("out.2.weight")[0]
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    n_in = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks."))
    downs = sorted(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.") and ".op.weight" in k)
    levels = len(downs) + 1
    nrb = (n_in - 1 - len(downs)) // levels
    mult, attn, ds, i = [], [], 1, 1
    for level in range(levels):
        for _ in range(nrb):
            mult.append(get(f"input_blocks.{i}.0.in_layers.2.weight")[0] // mc)
            if f"{prefix}input_blocks.{i}.1.norm.weight" in shapes and ds not in attn:
                attn.append(ds)
            i += 1
        if level != levels - 1:
            i += 1
            ds *= 2
    channel_mult = tuple(mult[::nrb])
    tb = [k for k in keys if ".transformer_blocks." in k and k.endswith("attn2.to_k.weight")]
    context_dim = shapes[prefix + tb[0]][1] if tb else None
    depth = 1 + max((int(k.split(".transformer_blocks.")[1].split(".")[0]) for k in tb), default=0)
    linear_proj = any(k.endswith("proj_in.weight") and len(shapes[prefix + k]) == 2 for k in keys)
    if context_dim is not None:
        # A model built with context_dim=None (attn2 attends to the image) has to_k as wide as its own block.
        # That is only recognisable when blocks of different widths all show it; otherwise pass context_dim.
        widths = {shapes[prefix + k][1] for k in tb}
        own = all(shapes[prefix + k][1] == shapes[prefix + k.split(".transformer_blocks.")[0] + ".norm.weight"][0]
                  for k in tb)
        if own and len(widths) > 1:
            context_dim = None
    if context_dim_override is not _UNSET:
        context_dim = context_dim_override
    if num_heads is None and num_head_channels is None:
        num_heads, num_head_channels = (-1, 64) if context_dim == 1024 else (8, -1)
    elif num_heads is None:
        num_heads = -1
    elif num_head_channels is None:
        num_head_channels = -1
    label = shapes.get(prefix + "label_emb.weight")
    cfg = UNetConfig(in_channels=cin, out_channels=cout, model_channels=mc, attention_resolutions=tuple(attn),
                     num_res_blocks=nrb, channel_mult=channel_mult, num_heads=num_heads,
                     num_head_channels=num_head_channels, transformer_depth=depth, context_dim=context_dim,
                     use_linear_in_transformer=linear_proj, num_classes=None if label is None else label[0],
                     norm_num_groups=norm_num_groups or _largest_groups(mc, channel_mult))
    expected = param_shapes(cfg, prefix)
    got = {k: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    if expected != got:
        bad = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and expected[k] != got[k]]
        raise ValueError(f"U-Net weights do not match the inferred config {cfg}: {len(bad)} keys differ, first: "
                         f"{bad[:5]}")
    return cfg


def _largest_groups(mc, mult):
    """32 groups as LDM when the channel counts allow it, else the largest power of two that divides them all."""
    g = 32
    while g > 1 and any((mc * m) % g for m in mult):
        g //= 2
    return g


def config_fields():
    return [f.name for f in fields(UNetConfig)]

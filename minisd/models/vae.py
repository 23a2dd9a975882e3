"""AutoencoderKL (the SD VAE): encoder, diagonal-Gaussian posterior, decoder; forward and hand-written backward.

Architecture and names follow LDM exactly (SD 1.x and 2.x share this VAE):
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/diffusionmodules/model.py (Encoder, Decoder)
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/models/autoencoder.py (AutoencoderKL)
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/distributions/distributions.py
Pitfalls (../shared/docs/sd-reference.md §1.3, §7): every GroupNorm here uses eps 1e-6; the encoder's downsample
pads right/bottom only (F.pad(x, (0, 1, 0, 1)) then a stride-2 conv with no padding); decoder `up.i` is level i,
run from the deepest level (i = 3) to the top; latents are scaled by 0.18215 for diffusion.

Shapes: image x (N, 3, H, W) in [-1, 1] -> moments (N, 2*embed_dim, H/f, W/f) with f = 2**(levels-1) (8 for SD)
-> mean, logvar -> z (N, embed_dim, H/f, W/f) -> decoded image (N, 3, H, W).
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from ..nn import Params, init_params
from ..ops.attention import attention_backward, attention_forward
from ..ops.conv import upsample_nearest2x_backward, upsample_nearest2x_forward
from .common import (check_finite, conv, conv_backward, group_norm, group_norm_backward_named, linear,
                     linear_backward_named)

PREFIX = "first_stage_model."
EPS = 1e-6  # LDM's Normalize(): GroupNorm(32, C, eps=1e-6) everywhere in the VAE
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution clamps logvar to this range


@dataclass(frozen=True)
class VAEConfig:
    """Autoencoder hyper-parameters, named as LDM's `first_stage_config.params.ddconfig` (+ embed_dim)."""
    in_channels: int = 3  # e.g. 3 (RGB), 1 (MNIST)
    out_ch: int = 3  # e.g. 3
    ch: int = 128  # base width, e.g. 128 (SD), 32 (tiny)
    ch_mult: tuple = (1, 2, 4, 4)  # width per level = ch * mult, e.g. (1, 2, 4, 4): 8x downsampling
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder: one more), e.g. 2
    attn_resolutions: tuple = ()  # resolutions with extra AttnBlocks (SD: none; the mid block always has one)
    resolution: int = 256  # training resolution; only used to place attn_resolutions, e.g. 256
    z_channels: int = 4  # latent channels, e.g. 4
    double_z: bool = True  # the encoder outputs mean and logvar (2*z_channels)
    embed_dim: int = 4  # channels after quant_conv / before post_quant_conv, e.g. 4
    dropout: float = 0.0
    scale_factor: float = 0.18215  # latents for diffusion = scale_factor * z (SD1 and SD2: 0.18215)
    norm_num_groups: int = 32  # LDM hard-codes 32 groups; tiny models need fewer

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for m in (1,) + self.ch_mult:
            if (self.ch * m) % self.norm_num_groups:
                raise ValueError(f"VAEConfig: {self.ch * m} channels not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self):
        return 2 ** (len(self.ch_mult) - 1)


SD = VAEConfig()  # SD 1.x and 2.x
TINY = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, resolution=16)
MNIST = VAEConfig(in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8,
                  resolution=28, z_channels=4, embed_dim=4, scale_factor=1.0)
PRESETS = {"SD": SD, "SD15": SD, "SD21": SD, "TINY": TINY, "MNIST": MNIST}


def _levels(cfg):
    """Per encoder level: (in width, out width, resolution) as Encoder.__init__ computes them."""
    out, res, block_in = [], cfg.resolution, cfg.ch
    for i, m in enumerate(cfg.ch_mult):
        out.append((block_in, cfg.ch * m, res))
        block_in = cfg.ch * m
        if i != len(cfg.ch_mult) - 1:
            res //= 2
    return out


def param_shapes(cfg, prefix=PREFIX):
    """{checkpoint key: shape} of every VAE parameter."""
    s = {}

    def resnet(n, cin, cout):
        s.update({f"{n}.norm1.weight": (cin,), f"{n}.norm1.bias": (cin,),
                  f"{n}.conv1.weight": (cout, cin, 3, 3), f"{n}.conv1.bias": (cout,),
                  f"{n}.norm2.weight": (cout,), f"{n}.norm2.bias": (cout,),
                  f"{n}.conv2.weight": (cout, cout, 3, 3), f"{n}.conv2.bias": (cout,)})
        if cin != cout:
            s.update({f"{n}.nin_shortcut.weight": (cout, cin, 1, 1), f"{n}.nin_shortcut.bias": (cout,)})

    def attn(n, c):
        s.update({f"{n}.norm.weight": (c,), f"{n}.norm.bias": (c,)})
        for k in ("q", "k", "v", "proj_out"):  # 1x1 convs in LDM files (Linear [c, c] in diffusers files)
            s.update({f"{n}.{k}.weight": (c, c, 1, 1), f"{n}.{k}.bias": (c,)})

    levels = _levels(cfg)
    zc = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    s.update({"encoder.conv_in.weight": (cfg.ch, cfg.in_channels, 3, 3), "encoder.conv_in.bias": (cfg.ch,)})
    for i, (cin, cout, res) in enumerate(levels):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin if j == 0 else cout, cout)
            if res in cfg.attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", cout)
        if i != len(levels) - 1:
            s.update({f"encoder.down.{i}.downsample.conv.weight": (cout, cout, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (cout,)})
    top = levels[-1][1]
    resnet("encoder.mid.block_1", top, top)
    attn("encoder.mid.attn_1", top)
    resnet("encoder.mid.block_2", top, top)
    s.update({"encoder.norm_out.weight": (top,), "encoder.norm_out.bias": (top,),
              "encoder.conv_out.weight": (zc, top, 3, 3), "encoder.conv_out.bias": (zc,)})
    s.update({"decoder.conv_in.weight": (top, cfg.z_channels, 3, 3), "decoder.conv_in.bias": (top,)})
    resnet("decoder.mid.block_1", top, top)
    attn("decoder.mid.attn_1", top)
    resnet("decoder.mid.block_2", top, top)
    block_in = top
    for i in reversed(range(len(levels))):
        cout, res = levels[i][1], levels[i][2]
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, cout)
            block_in = cout
            if res in cfg.attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", cout)
        if i != 0:
            s.update({f"decoder.up.{i}.upsample.conv.weight": (cout, cout, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (cout,)})
    s.update({"decoder.norm_out.weight": (cfg.ch,), "decoder.norm_out.bias": (cfg.ch,),
              "decoder.conv_out.weight": (cfg.out_ch, cfg.ch, 3, 3), "decoder.conv_out.bias": (cfg.out_ch,)})
    s.update({"quant_conv.weight": (2 * cfg.embed_dim, zc, 1, 1), "quant_conv.bias": (2 * cfg.embed_dim,),
              "post_quant_conv.weight": (cfg.z_channels, cfg.embed_dim, 1, 1),
              "post_quant_conv.bias": (cfg.z_channels,)})
    return {prefix + k: v for k, v in s.items()}


# ----------------------------------------------------------------------------------------------------------------
# blocks

def resnet_forward(P, n, x, groups, dropout=0.0, rng=None, keep=True):
    """ResnetBlock without timestep input: x (N, Cin, H, W) -> (N, Cout, H, W) = shortcut(x) + h.
    keep=False (inference): each intermediate is released as soon as the next layer has read it (the caches hold
    them), and no cache is returned; at 512x512 that halves the decoder's peak memory."""
    h, c_n1 = group_norm(P, n + "norm1", x, groups, EPS, act="silu")  # norm1 then swish, fused
    h, c_c1 = conv(P, n + "conv1", h)
    if not keep:
        c_n1 = c_c1 = None  # c_c1 held norm1's output
    h, c_n2 = group_norm(P, n + "norm2", h, groups, EPS, act="silu")
    mask = None
    if dropout > 0.0 and rng is not None:
        mask = xp_of(h).asarray((rng.random(h.shape) >= dropout).astype(h.dtype) / (1.0 - dropout))  # host rng
        h = h * mask
    h, c_c2 = conv(P, n + "conv2", h)
    if not keep:
        c_n2 = c_c2 = None  # they held conv1's and norm2's outputs
    c_sc = None
    if n + "nin_shortcut.weight" in P:
        s, c_sc = conv(P, n + "nin_shortcut", x, padding=0)
    else:
        s = x
    return s + h, ((c_n1, c_c1, c_n2, mask, c_c2, c_sc) if keep else None)


def resnet_backward(P, n, dy, cache):
    c_n1, c_c1, c_n2, mask, c_c2, c_sc = cache
    dh = conv_backward(P, n + "conv2", dy, c_c2)
    if mask is not None:
        dh = dh * mask
    dh = group_norm_backward_named(P, n + "norm2", dh, c_n2)
    dh = conv_backward(P, n + "conv1", dh, c_c1)
    dx = group_norm_backward_named(P, n + "norm1", dh, c_n1)
    dx += conv_backward(P, n + "nin_shortcut", dy, c_sc) if c_sc is not None else dy
    return dx


def attnblock_forward(P, n, x, groups):
    """AttnBlock: single-head self-attention over all pixels, scale C**-0.5, residual. x (N, C, H, W)."""
    N, C, H, W = x.shape
    h, c_n = group_norm(P, n + "norm", x, groups, EPS)
    tok = h.transpose(0, 2, 3, 1).reshape(N, H * W, C)  # (N, L, C)
    q, c_q = linear(P, n + "q", tok)  # q/k/v/proj_out are 1x1 convs: linear on tokens
    k, c_k = linear(P, n + "k", tok)
    v, c_v = linear(P, n + "v", tok)
    o, c_a = attention_forward(q, k, v, 1)  # one head of width C: scale C**-0.5 as LDM's int(c)**(-0.5)
    o, c_o = linear(P, n + "proj_out", o)
    y = o.reshape(N, H, W, C).transpose(0, 3, 1, 2) + x
    return y, (c_n, c_q, c_k, c_v, c_a, c_o, x.shape)


def attnblock_backward(P, n, dy, cache):
    c_n, c_q, c_k, c_v, c_a, c_o, (N, C, H, W) = cache
    do = linear_backward_named(P, n + "proj_out", dy.transpose(0, 2, 3, 1).reshape(N, H * W, C), c_o)
    dq, dk, dv = attention_backward(do, c_a)
    dtok = linear_backward_named(P, n + "q", dq, c_q)
    dtok += linear_backward_named(P, n + "k", dk, c_k)
    dtok += linear_backward_named(P, n + "v", dv, c_v)
    dx = group_norm_backward_named(P, n + "norm", dtok.reshape(N, H, W, C).transpose(0, 3, 1, 2), c_n)
    dx += dy
    return dx


# ----------------------------------------------------------------------------------------------------------------
# posterior

class Posterior(NamedTuple):
    """Diagonal Gaussian over latents. mean, logvar (clamped), std: (N, embed_dim, h, w)."""
    mean: np.ndarray
    logvar: np.ndarray
    std: np.ndarray
    clamped: np.ndarray  # bool mask where the clamp was active (its gradient is zero there)

    def sample(self, rng=None, noise=None):
        """mean + std * noise; pass `noise` (N(0,1), same shape) or an `rng` to draw it."""
        if noise is None:
            if rng is None:
                raise ValueError("Posterior.sample: pass rng (np.random.Generator) or noise")
            noise = rng.standard_normal(self.mean.shape).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over C, H, W: 0.5 * sum(mean^2 + var - 1 - logvar) -> (N,)."""
        var = self.std * self.std
        return 0.5 * np.sum(self.mean ** 2 + var - 1.0 - self.logvar, axis=(1, 2, 3))


def posterior_from_moments(moments):
    """moments (N, 2E, h, w) -> Posterior. The first E channels are the mean, the rest the log-variance."""
    mean, logvar = np.split(moments, 2, axis=1)
    clamped = (logvar < LOGVAR_MIN) | (logvar > LOGVAR_MAX)
    logvar = np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
    return Posterior(mean, logvar, np.exp(0.5 * logvar), clamped)


def posterior_backward(post, dmean=None, dlogvar=None, dsample=None, noise=None, dkl=None):
    """Gradient w.r.t. the moments (N, 2E, h, w) from gradients of a sample (with the noise that drew it), of the
    mean and logvar directly, and/or of kl() (dkl: (N,) weights of each item's KL)."""
    gm = np.zeros_like(post.mean) if dmean is None else dmean.copy()
    gl = np.zeros_like(post.logvar) if dlogvar is None else dlogvar.copy()
    if dsample is not None:  # sample = mean + exp(0.5 logvar) * noise
        gm += dsample
        gl += dsample * noise * 0.5 * post.std
    if dkl is not None:  # kl = 0.5 sum(mean^2 + exp(logvar) - 1 - logvar)
        w = np.asarray(dkl, dtype=post.mean.dtype).reshape(-1, 1, 1, 1)
        gm += w * post.mean
        gl += w * 0.5 * (post.std * post.std - 1.0)
    gl[post.clamped] = 0.0  # clip has zero gradient outside its range
    return np.concatenate([gm, gl], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# the model

class _NoCache(list):
    """The cache list of an inference pass (keep_cache=False): keeps nothing, so each block's activations are freed
    as soon as the next block has used them (a kept cache holds the block's input and intermediates: at 512x512
    one decoder level's caches are ~2 GB)."""
    def append(self, c):
        pass

    def __iadd__(self, items):
        return self


class VAE:
    """AutoencoderKL: `params` keyed by LDM names (`first_stage_model.encoder...`) and `config`.

    encode(x) -> (Posterior, cache); decode(z) -> (image, cache); encode_backward / decode_backward give input
    gradients and put parameter gradients into params.grads. Latents for diffusion are `scale_factor * z`.
    """

    def __init__(self, config=SD, params=None, rng=None, dtype=np.float32, prefix=PREFIX):
        self.config, self.prefix = config, prefix
        shapes = param_shapes(config, prefix)
        if params is None:
            rng = np.random.default_rng(0) if rng is None else rng
            params = Params(init_params(shapes, rng, dtype), compute_dtype=dtype)
        elif params.shapes() != shapes:
            Params({k: np.empty(0) for k in shapes}).load_state_dict(
                {k: np.empty(v) for k, v in params.shapes().items()})  # raises with a listing
        self.params = params

    @classmethod
    def from_weights(cls, params, prefix=PREFIX, **overrides):
        return cls(config_from_shapes(params.shapes(), prefix, **overrides), params=params, prefix=prefix)

    # ------------------------------------------------------------------------------------------------ encoder
    def encode(self, x, keep_cache=False, rng=None, trace=None):
        """x (N, in_channels, H, W) in [-1, 1] -> (Posterior over (N, embed_dim, H/f, W/f), cache).
        trace: optional callback trace(name, array) after each "encoder.down.i", "encoder.mid", "quant_conv"."""
        cfg, P, p = self.config, self.params, self.prefix + "encoder."
        f = cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"VAE.encode: x must be (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VAE.encode: image height and width must be multiples of {f}, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        check_finite("VAE.encode", x)
        G, keep = cfg.norm_num_groups, ([] if keep_cache else _NoCache())
        h, c = conv(P, p + "conv_in", x)
        keep.append(c)
        levels = _levels(cfg)
        for i, (_, _, res) in enumerate(levels):
            for j in range(cfg.num_res_blocks):
                h, c = resnet_forward(P, f"{p}down.{i}.block.{j}.", h, G, cfg.dropout, rng, keep=keep_cache)
                keep.append(c)
                if res in cfg.attn_resolutions:
                    h, c = attnblock_forward(P, f"{p}down.{i}.attn.{j}.", h, G)
                    keep.append(c)
            if i != len(levels) - 1:
                # asymmetric: LDM pads one zero column right and one row at the bottom, then stride 2, no pad
                h, c = conv(P, f"{p}down.{i}.downsample.conv", h, stride=2, padding=((0, 1), (0, 1)))
                keep.append(c)
            trace and trace(f"encoder.down.{i}", h)
        h, c1 = resnet_forward(P, p + "mid.block_1.", h, G, cfg.dropout, rng, keep=keep_cache)
        h, c2 = attnblock_forward(P, p + "mid.attn_1.", h, G)
        h, c3 = resnet_forward(P, p + "mid.block_2.", h, G, cfg.dropout, rng, keep=keep_cache)
        trace and trace("encoder.mid", h)
        h, c4 = group_norm(P, p + "norm_out", h, G, EPS, act="silu")
        h, c5 = conv(P, p + "conv_out", h)
        moments, c6 = conv(P, self.prefix + "quant_conv", h, padding=0)
        trace and trace("quant_conv", moments)
        keep += [c1, c2, c3, c4, c5, c6]
        return posterior_from_moments(moments), (keep if keep_cache else None)

    def encode_backward(self, dmoments, cache):
        """dmoments (N, 2*embed_dim, h, w) (from posterior_backward) -> dx (N, in_channels, H, W)."""
        if cache is None:
            raise ValueError("VAE.encode_backward: run encode with keep_cache=True")
        cfg, P, p = self.config, self.params, self.prefix + "encoder."
        keep = list(cache)
        d = conv_backward(P, self.prefix + "quant_conv", dmoments, keep.pop())
        d = conv_backward(P, p + "conv_out", d, keep.pop())
        d = group_norm_backward_named(P, p + "norm_out", d, keep.pop())
        d = resnet_backward(P, p + "mid.block_2.", d, keep.pop())
        d = attnblock_backward(P, p + "mid.attn_1.", d, keep.pop())
        d = resnet_backward(P, p + "mid.block_1.", d, keep.pop())
        levels = _levels(cfg)
        for i in reversed(range(len(levels))):  # reverse order of forward
            if i != len(levels) - 1:
                d = conv_backward(P, f"{p}down.{i}.downsample.conv", d, keep.pop())
            for j in reversed(range(cfg.num_res_blocks)):
                if levels[i][2] in cfg.attn_resolutions:
                    d = attnblock_backward(P, f"{p}down.{i}.attn.{j}.", d, keep.pop())
                d = resnet_backward(P, f"{p}down.{i}.block.{j}.", d, keep.pop())
        return conv_backward(P, p + "conv_in", d, keep.pop())

    # ------------------------------------------------------------------------------------------------ decoder
    def decode(self, z, keep_cache=False, rng=None, trace=None):
        """z (N, embed_dim, h, w) (unscaled: divide diffusion latents by scale_factor first) ->
        (image (N, out_ch, h*f, w*f), roughly in [-1, 1], cache).
        trace: optional callback trace(name, array) after "post_quant_conv", "conv_in", "mid", each "up.i" and
        "conv_out" (names of the LDM modules whose output it is)."""
        cfg, P, p = self.config, self.params, self.prefix + "decoder."
        if z.ndim != 4 or z.shape[1] != cfg.embed_dim:
            raise ValueError(f"VAE.decode: z must be (N, {cfg.embed_dim}, h, w), got {tuple(z.shape)}")
        check_finite("VAE.decode", z)
        G, keep = cfg.norm_num_groups, ([] if keep_cache else _NoCache())
        h, c = conv(P, self.prefix + "post_quant_conv", z, padding=0)
        keep.append(c)
        trace and trace("post_quant_conv", h)
        h, c = conv(P, p + "conv_in", h)
        keep.append(c)
        trace and trace("decoder.conv_in", h)
        h, c1 = resnet_forward(P, p + "mid.block_1.", h, G, cfg.dropout, rng, keep=keep_cache)
        h, c2 = attnblock_forward(P, p + "mid.attn_1.", h, G)
        h, c3 = resnet_forward(P, p + "mid.block_2.", h, G, cfg.dropout, rng, keep=keep_cache)
        keep += [c1, c2, c3]
        trace and trace("decoder.mid", h)
        levels = _levels(cfg)
        for i in reversed(range(len(levels))):  # deepest level first; up.i is level i
            for j in range(cfg.num_res_blocks + 1):
                h, c = resnet_forward(P, f"{p}up.{i}.block.{j}.", h, G, cfg.dropout, rng, keep=keep_cache)
                keep.append(c)
                if levels[i][2] in cfg.attn_resolutions:
                    h, c = attnblock_forward(P, f"{p}up.{i}.attn.{j}.", h, G)
                    keep.append(c)
            if i != 0:
                u, c_u = upsample_nearest2x_forward(h)
                h, c_c = conv(P, f"{p}up.{i}.upsample.conv", u)
                keep.append((c_u, c_c))
            trace and trace(f"decoder.up.{i}", h)
            if not keep_cache:
                keep.clear()  # inference: drop caches level by level (the decoder's activations are large)
        h, c4 = group_norm(P, p + "norm_out", h, G, EPS, act="silu")
        y, c5 = conv(P, p + "conv_out", h)
        trace and trace("decoder.conv_out", y)
        if not keep_cache:
            return y, None
        return y, keep + [c4, c5]

    def decode_backward(self, dy, cache):
        """dy (N, out_ch, H, W) -> dz (N, embed_dim, h, w)."""
        if cache is None:
            raise ValueError("VAE.decode_backward: run decode with keep_cache=True")
        cfg, P, p = self.config, self.params, self.prefix + "decoder."
        keep = list(cache)
        d = conv_backward(P, p + "conv_out", dy, keep.pop())
        d = group_norm_backward_named(P, p + "norm_out", d, keep.pop())
        levels = _levels(cfg)
        for i in range(len(levels)):  # reverse order of forward: top level first
            if i != 0:
                c_u, c_c = keep.pop()
                d = upsample_nearest2x_backward(conv_backward(P, f"{p}up.{i}.upsample.conv", d, c_c), c_u)
            for j in reversed(range(cfg.num_res_blocks + 1)):
                if levels[i][2] in cfg.attn_resolutions:
                    d = attnblock_backward(P, f"{p}up.{i}.attn.{j}.", d, keep.pop())
                d = resnet_backward(P, f"{p}up.{i}.block.{j}.", d, keep.pop())
        d = resnet_backward(P, p + "mid.block_2.", d, keep.pop())
        d = attnblock_backward(P, p + "mid.attn_1.", d, keep.pop())
        d = resnet_backward(P, p + "mid.block_1.", d, keep.pop())
        d = conv_backward(P, p + "conv_in", d, keep.pop())
        return conv_backward(P, self.prefix + "post_quant_conv", d, keep.pop())

    # ------------------------------------------------------------------------------------------ conveniences
    def encode_latents(self, x, rng=None, noise=None, sample=True):
        """Image in [-1, 1] -> diffusion latents scale_factor * z (z sampled from the posterior, or its mean)."""
        post, _ = self.encode(x)
        z = post.sample(rng=rng, noise=noise) if sample else post.mean
        return self.config.scale_factor * z

    def decode_latents(self, latents, tile=None, overlap=None):
        """Diffusion latents -> image in [-1, 1]: decode(latents / scale_factor). `tile` (latent pixels, e.g. 64)
        switches to tiled decoding for images too large to decode at once (see decode_tiled)."""
        z = latents / self.config.scale_factor
        if tile is not None and max(z.shape[2:]) > tile:
            return self.decode_tiled(z, tile, overlap if overlap is not None else tile // 4)
        return self.decode(z)[0]

    def decode_tiled(self, z, tile=64, overlap=16):
        """Decode overlapping latent tiles one at a time and blend the seams linearly (as diffusers' tiled_decode).

        Peak memory is that of one tile. The result is close to, not equal to, a full decode: GroupNorm sees
        only its tile's statistics, and the blend hides the seams. z (N, E, h, w) -> (N, out_ch, h*f, w*f).
        """
        f, (N, _, h, w) = self.config.downsample_factor, z.shape
        step = tile - overlap
        if step <= 0:
            raise ValueError(f"VAE.decode_tiled: overlap ({overlap}) must be smaller than tile ({tile})")
        xp = xp_of(z)  # numpy or cupy: the blend buffers live on z's device; the ramps are built on the host
        out = xp.zeros((N, self.config.out_ch, h * f, w * f), dtype=z.dtype)
        weight = xp.zeros((1, 1, h * f, w * f), dtype=z.dtype)
        ramp = np.minimum(1.0, (np.arange(tile * f) + 0.5) / (overlap * f)) if overlap else np.ones(tile * f)
        for y0 in list(range(0, max(h - overlap, 1), step)):
            for x0 in list(range(0, max(w - overlap, 1), step)):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                img = self.decode(z[:, :, y0:y1, x0:x1])[0]
                th, tw = img.shape[2:]
                # weights rise from the tile's leading edges (not at the image border), so overlaps cross-fade
                wy = ramp[:th].copy() if y0 > 0 else np.ones(th)
                wx = ramp[:tw].copy() if x0 > 0 else np.ones(tw)
                if y1 < h:
                    wy = np.minimum(wy, ramp[:th][::-1])
                if x1 < w:
                    wx = np.minimum(wx, ramp[:tw][::-1])
                wt = xp.asarray((wy[:, None] * wx[None, :]).astype(z.dtype))
                out[:, :, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += img * wt
                weight[:, :, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += wt
        return out / weight


def config_from_shapes(shapes, prefix=PREFIX, norm_num_groups=None, resolution=None, scale_factor=0.18215):
    """Infer a VAEConfig from parameter shapes, then check every shape against it. attn_resolutions are
    recognised from `down.i.attn` keys given `resolution` (default 256, as SD's config)."""
    def get(k):
        if prefix + k not in shapes:
            raise ValueError(f"VAE weights: missing {prefix + k}; is this a Stable Diffusion VAE?")
        return shapes[prefix + k]

    ch, cin = get("encoder.conv_in.weight")[:2]
    out_ch = get("decoder.conv_out.weight")[0]
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    levels = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.down."))
    nrb = 1 + max(int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block."))
    mult = tuple(get(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    zc2 = get("encoder.conv_out.weight")[0]
    zc = get("decoder.conv_in.weight")[1]
    embed = get("post_quant_conv.weight")[1]
    resolution = resolution or 256
    attn = tuple(sorted({resolution // 2 ** int(k.split(".")[2]) for k in keys
                         if k.startswith("encoder.down.") and ".attn." in k}, reverse=True))
    groups = norm_num_groups or next(g for g in (32, 16, 8, 4, 2, 1)
                                     if all((ch * m) % g == 0 for m in (1,) + mult))
    cfg = VAEConfig(in_channels=cin, out_ch=out_ch, ch=ch, ch_mult=mult, num_res_blocks=nrb,
                    attn_resolutions=attn, resolution=resolution, z_channels=zc, double_z=zc2 == 2 * zc,
                    embed_dim=embed, scale_factor=scale_factor, norm_num_groups=groups)
    expected = param_shapes(cfg, prefix)
    got = {k: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    if expected != got:
        bad = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and expected[k] != got[k]]
        raise ValueError(f"VAE weights do not match the inferred config: {len(bad)} keys differ, first: {bad[:5]}")
    return cfg

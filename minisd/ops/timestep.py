"""Sinusoidal timestep embedding of the diffusion U-Net (the DDPM / Transformer positional encoding).

t (N,) timesteps (ints or floats; fractional values are fine, as k-diffusion style samplers produce them)
-> emb (N, dim):  half = dim // 2,  freqs[i] = exp(-ln(max_period) * i / (half - downscale_freq_shift)),
args = t[:, None] * freqs[None, :],  emb = [cos(args), sin(args)] (flip_sin_to_cos=True, SD's order) or
[sin(args), cos(args)]; an odd dim gets one zero column at the end.

SD 1.x/2.x: dim = model_channels = 320, max_period 10000, cos first, shift 0 (LDM `timestep_embedding`, diffusers
`Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)`). diffusers' default shift is 1 (DDPM's UNet2D).

Forward only: the timestep is an input, not something trained, so there is no gradient with respect to t and
no backward function (DEVELOPERS.md §1). The gradient of the loss still flows into the time-embedding MLP that
consumes this array.

Precision: computed in float64 and rounded once to the output dtype. The references compute in float32, where
an argument t * freq near 1000 is itself rounded by up to 3e-5, so their float32 output differs from the exact
value (and from this one) by up to ~1e-4; the tests compare against a float64 evaluation of the formula tightly
and against the float32 references within that documented rounding.

References:
  LDM: https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/diffusionmodules/util.py
    (function timestep_embedding)
  diffusers get_timestep_embedding:
    https://github.com/huggingface/diffusers/blob/v0.30.3/src/diffusers/models/embeddings.py#L27
  Vaswani et al. 2017 (the sinusoid), https://arxiv.org/abs/1706.03762
"""
import math

import numpy as np

from .common import check_ndim


def timestep_embedding(t, dim, max_period=10000, flip_sin_to_cos=True, downscale_freq_shift=0, dtype=None):
    """t (N,) int or float -> emb (N, dim) in `dtype` (default: t's float dtype, float32 for integer t).

    flip_sin_to_cos=True gives [cos, sin] (SD); downscale_freq_shift is diffusers' `freq_shift` (0 for SD).
    """
    t = np.asarray(t)
    check_ndim("timestep_embedding", "t", t, 1)
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"timestep_embedding: argument 't' must hold numbers, got dtype {t.dtype}")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"timestep_embedding: dim must be a positive integer, got {dim!r}")
    half = dim // 2
    if half and half - downscale_freq_shift <= 0:
        raise ValueError(f"timestep_embedding: half = dim // 2 = {half} must exceed downscale_freq_shift "
                         f"= {downscale_freq_shift}")
    if dtype is None:
        dtype = t.dtype if np.issubdtype(t.dtype, np.floating) else np.float32
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float64) / (half - downscale_freq_shift)
    args = t.astype(np.float64)[:, None] * np.exp(exponent)[None, :]  # (N, half)
    first, second = (np.cos(args), np.sin(args)) if flip_sin_to_cos else (np.sin(args), np.cos(args))
    emb = np.zeros((t.shape[0], dim), dtype=dtype)  # an odd dim keeps its last column at zero (diffusers pads)
    emb[:, :half] = first
    emb[:, half:2 * half] = second
    return emb

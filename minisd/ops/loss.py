"""Mean squared error, the diffusion training loss (DDPM's L_simple: MSE between the true and predicted noise).

pred (...), target (...) same shape -> loss = mean((pred - target)^2) over all elements (a 0-d scalar of the
input dtype, like torch.nn.functional.mse_loss with reduction="mean").
Backward: dpred = dloss * 2 (pred - target) / n. The target is data (noise, latents), so it gets no gradient.

References: Ho et al. 2020, eq. 14, https://arxiv.org/abs/2006.11239 ;
  https://pytorch.org/docs/2.5/generated/torch.nn.functional.mse_loss.html
"""
from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from .common import check_float


class MSECache(NamedTuple):
    pred: np.ndarray  # (...) references, not copies: pred - target is recomputed in backward
    target: np.ndarray  # (...)


def mse_loss_forward(pred, target):
    """pred (...), target (...) -> (loss 0-d array of pred's dtype, cache)."""
    check_float("mse_loss", pred=pred, target=target)
    if pred.shape != target.shape:
        raise ValueError(f"mse_loss: argument 'target' must have the shape of 'pred' {tuple(pred.shape)}, "
                         f"got {tuple(target.shape)} (no broadcasting: it would silently average the wrong pairs)")
    if pred.size == 0:
        raise ValueError("mse_loss: 'pred' is empty; the mean of no elements is undefined")
    sq = pred - target
    np.square(sq, out=sq)  # in place: one temporary the size of pred
    loss = sq.sum() / pred.dtype.type(pred.size)  # ndarray.sum is pairwise: error O(log n) ulps, not O(n)
    return xp_of(pred).asarray(loss, dtype=pred.dtype), MSECache(pred, target)


def mse_loss_backward(dloss, cache):
    """dloss: scalar (1.0 when the MSE is the whole loss) -> dpred (...) = dloss * 2 (pred - target) / n."""
    pred, target = cache
    dpred = pred - target
    dpred *= pred.dtype.type(2.0 * float(dloss) / pred.size)
    return dpred

"""Named-parameter wrappers around the ops, so block code reads like the original model code.

Each wrapper looks up `<name>.weight` / `<name>.bias` in a `Params`, calls the op, and its `_backward` twin hands
the parameter gradients to `params.add_grad` and returns only the input gradient. That keeps every block's
forward and backward straight-line: one line per layer, named exactly as the checkpoint names it.

Shapes: as the underlying ops (minisd/ops). Glossary: N=batch, C=channels, H,W=spatial, L=tokens, D=width.
"""
from ..ops.conv import conv2d_backward, conv2d_forward
from ..ops.linear import linear_backward, linear_forward
from ..ops.norm import group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward


def conv(P, name, x, stride=1, padding=1):
    """Conv2d with weight `name.weight` (Cout, Cin, K, K) and optional `name.bias`. x (N, Cin, H, W)."""
    return conv2d_forward(x, P[name + ".weight"], P.get(name + ".bias"), stride, padding)


def conv_backward(P, name, dy, cache):
    dx, dw, db = conv2d_backward(dy, cache)
    P.add_grad(name + ".weight", dw)
    if db is not None:
        P.add_grad(name + ".bias", db)
    return dx


def linear(P, name, x):
    """Linear on the last axis. x (..., Din) -> (..., Dout).

    LDM stores some token-wise projections as 1x1 convolutions (SD1's proj_in/proj_out, the VAE attention
    q/k/v/proj_out): weight (Dout, Din, 1, 1). On tokens a 1x1 conv *is* a linear layer, so the weight is viewed
    as (Dout, Din) here and its gradient reshaped back; the checkpoint layout is kept.
    """
    w = P[name + ".weight"]
    if w.ndim == 4:
        w = w.reshape(w.shape[0], w.shape[1])  # (Dout, Din, 1, 1) -> (Dout, Din), a view
    return linear_forward(x, w, P.get(name + ".bias"))


def linear_backward_named(P, name, dy, cache):
    dx, dw, db = linear_backward(dy, cache)
    P.add_grad(name + ".weight", dw.reshape(P.data[name + ".weight"].shape))
    if db is not None:
        P.add_grad(name + ".bias", db)
    return dx


def group_norm(P, name, x, groups, eps, act=None):
    """GroupNorm with affine `name.weight`/`name.bias` (C,), optionally fused with the SiLU that follows it."""
    return group_norm_forward(x, P[name + ".weight"], P[name + ".bias"], groups, eps, act=act)


def group_norm_backward_named(P, name, dy, cache):
    dx, dg, db = group_norm_backward(dy, cache)
    P.add_grad(name + ".weight", dg)
    P.add_grad(name + ".bias", db)
    return dx


def layer_norm(P, name, x, eps):
    """LayerNorm over the last axis with affine `name.weight`/`name.bias` (D,)."""
    return layer_norm_forward(x, P[name + ".weight"], P[name + ".bias"], eps)


def layer_norm_backward_named(P, name, dy, cache):
    dx, dg, db = layer_norm_backward(dy, cache)
    P.add_grad(name + ".weight", dg)
    P.add_grad(name + ".bias", db)
    return dx


def check_finite(where, x):
    """Non-finite inputs would silently poison every later step; say where they came from instead."""
    xp_sum = x.sum()  # one reduction: NaN or inf anywhere makes the sum non-finite
    if not bool(abs(xp_sum) < float("inf")):
        raise ValueError(f"{where}: input contains NaN or infinity; check the data, the latents file, or the "
                         f"previous step (a diverging sampler or a fp16 overflow)")

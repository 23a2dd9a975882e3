"""Linear (fully connected) layer and embedding lookup.

Shapes: x (..., Din) -> y (..., Dout); the weight is stored (Dout, Din) as PyTorch and the checkpoints store
it, so no transposes are needed when loading. Embedding: ids (...) int -> (..., D) rows of a (V, D) table.
References: CS231n affine_forward/backward; llm.c matmul_forward/backward (train_gpt2.c).
"""
from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from .common import check_float, check_ndim, check_shape


class LinearCache(NamedTuple):
    x: np.ndarray  # (..., Din) the input, needed for dw
    w: np.ndarray  # (Dout, Din), needed for dx
    has_bias: bool


def linear_forward(x, w, b=None):
    """y = x @ w.T + b.  x (..., Din), w (Dout, Din), b (Dout,) or None -> y (..., Dout)."""
    check_ndim("linear", "w", w, 2)
    check_shape("linear", "x", x, (None,) * (x.ndim - 1) + (w.shape[1],))
    if b is not None:
        check_shape("linear", "b", b, (w.shape[0],))
    check_float("linear", x=x, w=w, b=b)
    lead = x.shape[:-1]
    # One big GEMM over all leading dims: (M, Din) @ (Din, Dout). matmul on a 3-D x would loop over the batch.
    y = x.reshape(-1, x.shape[-1]) @ w.T  # (M, Dout)
    if b is not None:
        y += b
    return y.reshape(lead + (w.shape[0],)), LinearCache(x, w, b is not None)


def linear_backward(dy, cache):
    """dy (..., Dout) -> (dx (..., Din), dw (Dout, Din), db (Dout,) or None)."""
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (M, Dout)
    dx = (dy2 @ w).reshape(x.shape)  # forward was y = x w^T, so dx = dy w
    dw = dy2.T @ x.reshape(-1, x.shape[-1])  # (Dout, Din) = sum over rows of dy_m^T x_m
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db


class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # (...) int token ids
    vocab: int  # V, rows of the table


def embedding_forward(ids, table):
    """Row lookup. ids (...) integer array with values in [0, V), table (V, D) -> (..., D)."""
    check_ndim("embedding", "table", table, 2)
    xp = xp_of(ids, table)
    if not xp.issubdtype(ids.dtype, xp.integer):
        raise ValueError(f"embedding: argument 'ids' must be an integer array, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(f"embedding: ids must lie in [0, {table.shape[0]}), got min {int(ids.min())} "
                         f"max {int(ids.max())}")
    return table[ids], EmbeddingCache(ids, table.shape[0])


def embedding_backward(dy, cache):
    """dy (..., D) -> dtable (V, D): each row sums the gradients of every position that looked it up."""
    ids, vocab = cache
    xp = xp_of(dy)
    dtable = xp.zeros((vocab, dy.shape[-1]), dtype=dy.dtype)
    # add.at accumulates repeated ids correctly (plain fancy-index += would keep only the last write)
    xp.add.at(dtable, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    return dtable

"""GroupNorm (+ fused SiLU) and LayerNorm: float64 finite differences, PyTorch parity on odd shapes (float32 and
float64, including inputs spanning several row blocks/threads), bad input."""
import numpy as np
import pytest

from minisd.ops.norm import group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward
from minisd.testing import numerical_gradient, rel_error


def _params(rng, C, dtype):
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return gamma, beta


# ------------------------------------------------------------------------------------------------------------ GroupNorm

@pytest.mark.parametrize("shape,G,act", [
    ((2, 6, 3, 5), 3, None),
    ((2, 6, 3, 5), 3, "silu"),
    ((1, 4, 3, 3), 1, "silu"),  # one group: LayerNorm over (C, H, W)
    ((3, 5, 2, 3), 5, None),  # G = C: InstanceNorm
    ((2, 6, 7), 2, "silu"),  # 3-D input (N, C, L)
])
def test_group_norm_gradcheck_float64(rng, shape, G, act):
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = _params(rng, shape[1], np.float64)
    dy = rng.standard_normal(shape)
    y, cache = group_norm_forward(x, gamma, beta, G, 1e-5, act=act)
    dx, dgamma, dbeta = group_norm_backward(dy, cache)
    assert y.dtype == dx.dtype == dgamma.dtype == np.float64
    f = lambda: group_norm_forward(x, gamma, beta, G, 1e-5, act=act)[0]  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x, dy)) < 1e-6
    assert rel_error(dgamma, numerical_gradient(f, gamma, dy)) < 1e-6
    assert rel_error(dbeta, numerical_gradient(f, beta, dy)) < 1e-6


def _torch_group_norm(x, gamma, beta, G, eps, act, dy, dtype):
    torch = pytest.importorskip("torch")
    tx, tg, tb = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, gamma, beta))
    ty = torch.nn.functional.group_norm(tx, G, tg, tb, eps)
    if act == "silu":
        ty = torch.nn.functional.silu(ty)
    ty.backward(torch.tensor(dy, dtype=dtype))
    return ty.detach().numpy(), tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shape,G", [
    ((1, 6, 7, 11), 3), ((3, 6, 7, 11), 3), ((3, 6, 7, 11), 6), ((3, 6, 13), 2),
    ((2, 12), 3),  # 2-D (N, C): 4 values per group
    ((3, 64, 37, 41), 32),  # 96 rows of 3034 values: one block per thread, 1517-value channel rows
])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_group_norm_matches_torch(rng, shape, G, act, eps):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)  # |mean| comparable to std
    gamma, beta = _params(rng, shape[1], np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, cache = group_norm_forward(x, gamma, beta, G, eps, act=act)
    grads = group_norm_backward(dy, cache)
    ref = _torch_group_norm(x, gamma, beta, G, eps, act, dy, torch.float32)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    assert cache.mean.shape == cache.rstd.shape == (shape[0], G)
    for got, want in zip((y,) + grads, ref):
        assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("act", [None, "silu"])
def test_group_norm_float64_matches_torch_float64(rng, act):
    torch = pytest.importorskip("torch")
    shape, G = (3, 10, 9, 7), 5
    x = rng.standard_normal(shape) * 3 + 2
    gamma, beta = _params(rng, 10, np.float64)
    dy = rng.standard_normal(shape)
    y, cache = group_norm_forward(x, gamma, beta, G, 1e-6, act=act)
    grads = group_norm_backward(dy, cache)
    for got, want in zip((y,) + grads, _torch_group_norm(x, gamma, beta, G, 1e-6, act, dy, torch.float64)):
        assert rel_error(got, want) < 1e-12


def test_group_norm_large_mean_and_non_contiguous(rng):
    torch = pytest.importorskip("torch")
    # mean 1000 x std: a one-pass E[x^2] - E[x]^2 variance would lose most digits in float32
    base = (1000 + rng.standard_normal((2, 8, 9, 12))).astype(np.float32)
    x = base.transpose(0, 1, 3, 2)  # strided view (2, 8, 12, 9)
    gamma, beta = _params(rng, 8, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, cache = group_norm_forward(x, gamma, beta, 4, 1e-5)
    grads = group_norm_backward(dy, cache)
    ref64 = _torch_group_norm(x.astype(np.float64), gamma, beta, 4, 1e-5, None, dy, torch.float64)
    for got, want in zip((y,) + grads, ref64):
        assert rel_error(got, want) < 1e-4  # float32 inputs whose last digits are ~1e-4 of their size


def test_group_norm_bad_input():
    x = np.zeros((2, 6, 4, 4), np.float32)
    g, b = np.ones(6, np.float32), np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=r"group_norm: num_groups=4 must be a positive divisor of the C=6 channels"):
        group_norm_forward(x, g, b, 4, 1e-5)
    with pytest.raises(ValueError, match=r"group_norm: argument 'gamma' must have shape \(6,\), got \(5,\)"):
        group_norm_forward(x, np.ones(5, np.float32), b, 3, 1e-5)
    with pytest.raises(ValueError, match=r"group_norm: argument 'x' must be"):
        group_norm_forward(np.zeros(6, np.float32), g, b, 3, 1e-5)
    with pytest.raises(ValueError, match="group_norm: act must be one of"):
        group_norm_forward(x, g, b, 3, 1e-5, act="relu")
    with pytest.raises(ValueError, match="dtype"):
        group_norm_forward(x, g.astype(np.float64), b, 3, 1e-5)
    with pytest.raises(ValueError, match="group_norm: float16 input is not supported"):
        group_norm_forward(x.astype(np.float16), g.astype(np.float16), b.astype(np.float16), 3, 1e-5)
    _, cache = group_norm_forward(x, g, b, 3, 1e-5)
    with pytest.raises(ValueError, match=r"group_norm_backward: argument 'dy' must have shape \(2, 6, 4, 4\)"):
        group_norm_backward(np.zeros((2, 6, 4), np.float32), cache)


# ------------------------------------------------------------------------------------------------------------ LayerNorm

@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 4), (6,)])
def test_layer_norm_gradcheck_float64(rng, shape):
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = _params(rng, shape[-1], np.float64)
    dy = rng.standard_normal(shape)
    y, cache = layer_norm_forward(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = layer_norm_backward(dy, cache)
    f = lambda: layer_norm_forward(x, gamma, beta, 1e-5)[0]  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x, dy)) < 1e-6
    assert rel_error(dgamma, numerical_gradient(f, gamma, dy)) < 1e-6
    assert rel_error(dbeta, numerical_gradient(f, beta, dy)) < 1e-6


def _torch_layer_norm(x, gamma, beta, eps, dy, dtype):
    torch = pytest.importorskip("torch")
    tx, tg, tb = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, gamma, beta))
    ty = torch.nn.functional.layer_norm(tx, (x.shape[-1],), tg, tb, eps)
    ty.backward(torch.tensor(dy, dtype=dtype))
    return ty.detach().numpy(), tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shape", [(1, 13), (3, 5, 7), (3, 77, 75), (3, 700, 130)])  # last: 3 row blocks
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm_matches_torch(rng, shape, eps):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    gamma, beta = _params(rng, shape[-1], np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, cache = layer_norm_forward(x, gamma, beta, eps)
    grads = layer_norm_backward(dy, cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    for got, want in zip((y,) + grads, _torch_layer_norm(x, gamma, beta, eps, dy, torch.float32)):
        assert rel_error(got, want) < 1e-5


def test_layer_norm_float64_matches_torch_float64(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 9, 20)) + 5
    gamma, beta = _params(rng, 20, np.float64)
    dy = rng.standard_normal(x.shape)
    y, cache = layer_norm_forward(x, gamma, beta, 1e-5)
    grads = layer_norm_backward(dy, cache)
    for got, want in zip((y,) + grads, _torch_layer_norm(x, gamma, beta, 1e-5, dy, torch.float64)):
        assert rel_error(got, want) < 1e-12


def test_layer_norm_bad_input():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"layer_norm: argument 'gamma' must have shape \(5,\), got \(4,\)"):
        layer_norm_forward(x, np.ones(4, np.float32), np.zeros(5, np.float32), 1e-5)
    with pytest.raises(ValueError, match=r"layer_norm: argument 'beta' must have shape \(5,\)"):
        layer_norm_forward(x, np.ones(5, np.float32), np.zeros(3, np.float32), 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        layer_norm_forward(x.astype(np.float64), np.ones(5, np.float32), np.zeros(5, np.float32), 1e-5)
    with pytest.raises(ValueError, match="layer_norm: float16 input is not supported"):
        layer_norm_forward(x.astype(np.float16), np.ones(5, np.float16), np.zeros(5, np.float16), 1e-5)
    _, cache = layer_norm_forward(x, np.ones(5, np.float32), np.zeros(5, np.float32), 1e-5)
    with pytest.raises(ValueError, match=r"layer_norm_backward: argument 'dy' must have shape \(2, 5\)"):
        layer_norm_backward(np.zeros((5, 2), np.float32), cache)


# ------------------------------------------------------------------------------------------------------------ blocks

@pytest.mark.parametrize("act", [None, "silu"])
def test_row_blocks_do_not_change_results(rng, monkeypatch, act):
    """How the rows are cut into blocks (many small ones, one per thread, or a single one) changes only the speed:
    every block computes per-row results. Small blocks here make each thread run several of them."""
    import minisd.ops.norm as norm
    x = (rng.standard_normal((3, 12, 9, 11)) * 2 + 1).astype(np.float32)  # 36 GroupNorm rows of 297 values
    xl = (rng.standard_normal((5, 37, 24)) + 1).astype(np.float32)  # 185 LayerNorm rows of 24 values
    gamma, beta = _params(rng, 12, np.float32)
    gl, bl = _params(rng, 24, np.float32)
    dy, dyl = rng.standard_normal(x.shape).astype(np.float32), rng.standard_normal(xl.shape).astype(np.float32)

    def run():
        y, c = group_norm_forward(x, gamma, beta, 4, 1e-5, act=act)
        yl, cl = layer_norm_forward(xl, gl, bl, 1e-5)
        return (y,) + group_norm_backward(dy, c) + (yl,) + layer_norm_backward(dyl, cl)

    monkeypatch.setattr(norm, "BLOCK", 1 << 30)
    monkeypatch.setattr(norm, "MIN_SPLIT", 1 << 30)
    whole = run()  # one block for everything
    monkeypatch.setattr(norm, "BLOCK", 700)
    monkeypatch.setattr(norm, "MIN_SPLIT", 1)
    cut = run()  # GroupNorm: 2 rows of 297 values per block; LayerNorm: 29 rows per block
    # per-row results (y, dx) are the same sums in the same order; LayerNorm's dgamma / dbeta add one partial per
    # block (fixed blocks, so the same on any thread count) and so differ by float32 rounding of a 185-term sum
    for i, (a, b) in enumerate(zip(whole, cut)):
        np.testing.assert_allclose(a, b, rtol=1e-5 if i in (6, 7) else 1e-6, atol=1e-6)

"""timestep_embedding against LDM's formula and diffusers' get_timestep_embedding; mse_loss: float64 finite
differences, PyTorch parity, bad input."""
import math

import numpy as np
import pytest

from minisd.ops.loss import mse_loss_backward, mse_loss_forward
from minisd.ops.timestep import timestep_embedding
from minisd.testing import numerical_gradient, rel_error


# ------------------------------------------------------------------------------------------------ timestep embedding

def _ldm_float64(t, dim, max_period=10000):
    """LDM util.timestep_embedding (cos first, zero column for odd dim) evaluated in torch float64."""
    torch = pytest.importorskip("torch")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = torch.tensor(t, dtype=torch.float64)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.numpy()


def _timesteps(rng):
    # SD's integer range, fractional values (k-diffusion style samplers) and 0
    return np.concatenate([[0, 1, 999], rng.integers(0, 1000, 20), rng.uniform(0, 1000, 10)])


@pytest.mark.parametrize("dim", [320, 7, 3])
def test_timestep_embedding_matches_ldm_formula_float64(rng, dim):
    t = _timesteps(rng)
    emb = timestep_embedding(t.astype(np.float64), dim)
    assert emb.dtype == np.float64 and emb.shape == (t.size, dim)
    assert rel_error(emb, _ldm_float64(t, dim)) < 1e-12
    emb32 = timestep_embedding(t.astype(np.float32), dim)
    assert emb32.dtype == np.float32
    # float32 output: the exact value rounded once (float32 t is exact for these integers/values)
    assert rel_error(emb32, _ldm_float64(t.astype(np.float32), dim)) < 1e-7


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0), (320, False, 1), (7, True, 1), (64, False, 0)])
def test_timestep_embedding_matches_diffusers(rng, dim, flip, shift):
    torch = pytest.importorskip("torch")
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = _timesteps(rng).astype(np.float32)
    ref = emb_mod.get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip,
                                         downscale_freq_shift=shift).numpy()
    emb = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    # diffusers computes in float32: args t*freq up to 1000 are rounded by up to ulp(1000)/2 = 3.1e-5 and
    # torch's float32 exp is not always correctly rounded, which moves an arg by up to 1000 * 2^-24 more:
    # the float32 reference is itself only good to ~1e-4 (we are exact to float32 rounding, see above)
    assert rel_error(emb, ref) < 1.5e-4
    small = t < 1.5  # small arguments: the float32 reference is precise, so the comparison is tight
    assert rel_error(emb[small], ref[small]) < 1e-6
    if dim % 2:
        np.testing.assert_array_equal(emb[:, -1], 0)  # diffusers pads an odd dim with one zero column


def test_timestep_embedding_order_and_dtypes():
    emb = timestep_embedding(np.array([0, 5]), 6)  # integer t -> float32
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 0, 0, 0])  # t = 0: cos = 1 first, then sin = 0
    np.testing.assert_allclose(emb[1, [0, 3]], [math.cos(5), math.sin(5)], rtol=1e-6)  # freq[0] = 1
    assert timestep_embedding(np.array([3]), 8, dtype=np.float64).dtype == np.float64
    flipped = timestep_embedding(np.array([5.0]), 6, flip_sin_to_cos=False)
    np.testing.assert_array_equal(flipped[:, :3], timestep_embedding(np.array([5.0]), 6)[:, 3:])


def test_timestep_embedding_bad_input():
    with pytest.raises(ValueError, match="timestep_embedding: argument 't' must be 1-D"):
        timestep_embedding(np.zeros((2, 3)), 8)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        timestep_embedding(np.zeros(2), 0)
    with pytest.raises(ValueError, match="must exceed downscale_freq_shift"):
        timestep_embedding(np.zeros(2), 2, downscale_freq_shift=1)
    with pytest.raises(ValueError, match="must hold numbers"):
        timestep_embedding(np.array(["a"]), 8)


# ------------------------------------------------------------------------------------------------------------ MSE

def test_mse_gradcheck_float64(rng):
    pred = rng.standard_normal((3, 4, 5))
    target = rng.standard_normal((3, 4, 5))
    loss, cache = mse_loss_forward(pred, target)
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, ((pred - target) ** 2).mean(), rtol=1e-14)
    dloss = 0.37
    dpred = mse_loss_backward(dloss, cache)
    assert rel_error(dpred, numerical_gradient(lambda: mse_loss_forward(pred, target)[0], pred, dloss)) < 1e-6


@pytest.mark.parametrize("shape", [(1, 4, 7, 11), (3, 4, 9, 5), (2, 4, 64, 64)])
def test_mse_matches_torch(rng, shape):
    torch = pytest.importorskip("torch")
    pred = rng.standard_normal(shape).astype(np.float32)
    target = rng.standard_normal(shape).astype(np.float32)
    loss, cache = mse_loss_forward(pred, target)
    dpred = mse_loss_backward(1.0, cache)
    tp = torch.tensor(pred, requires_grad=True)
    tl = torch.nn.functional.mse_loss(tp, torch.tensor(target))
    tl.backward()
    assert loss.dtype == dpred.dtype == np.float32
    assert rel_error(loss, tl.detach().numpy()) < 1e-6
    assert rel_error(dpred, tp.grad.numpy()) < 1e-6


def test_mse_bad_input():
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"mse_loss: argument 'target' must have the shape of 'pred' \(2, 3\)"):
        mse_loss_forward(a, np.zeros((3,), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        mse_loss_forward(a, a.astype(np.float64))
    with pytest.raises(ValueError, match="empty"):
        mse_loss_forward(np.zeros(0, np.float32), np.zeros(0, np.float32))

"""U-Net: key set and parameter count of SD 1.x/2.x, parity with diffusers (outputs and every gradient), float64
finite differences on a tiny config, bad input. Full-size SD 1.5 / 2.1 parity runs in the slow tests."""
import dataclasses

import numpy as np
import pytest

from minisd.models import unet as U
from minisd.testing import numerical_gradient, rel_error

from refmodels import diffusers_unet_config, randomize_, state_numpy, unet_params_from_diffusers, worst_grad_error
from weights_convert import names


def read_keys(path, prefix):
    out = {}
    for line in open(path):
        k, shape = line.split(" ", 1)
        if k.startswith(prefix):
            out[k] = tuple(int(s) for s in shape.strip()[1:-1].split(",") if s.strip())
    return out


# ------------------------------------------------------------------------------------------------ structure

def test_parameter_counts_match_published():
    # published totals (BK-SDM's thop count 859,520,964) and the SD2 count from the exact architecture
    assert sum(int(np.prod(s)) for s in U.param_shapes(U.SD15).values()) == 859_520_964
    assert sum(int(np.prod(s)) for s in U.param_shapes(U.SD21).values()) == 865_910_724


@pytest.mark.parametrize("which,cfg", [("sd1", U.SD15), ("sd2", U.SD21)])
def test_keys_equal_checkpoint_key_list(shared_dir, which, cfg):
    ref = read_keys(shared_dir / f"data/sd_keys/{which}_ldm_expected_keys.txt", U.PREFIX)
    assert U.param_shapes(cfg) == ref
    assert U.config_from_shapes(ref) == cfg


@pytest.mark.parametrize("name", ["TINY", "TINY_MNIST_LATENT", "CIFAR_PIXEL"])
def test_config_from_shapes_round_trips(name):
    cfg = U.PRESETS[name]
    got = U.config_from_shapes(U.param_shapes(cfg), num_heads=cfg.num_heads, norm_num_groups=cfg.norm_num_groups,
                               context_dim_override=cfg.context_dim)
    assert got == dataclasses.replace(cfg, dropout=0.0)  # dropout is not visible in weights


def test_config_from_shapes_rejects_foreign_weights():
    shapes = U.param_shapes(U.TINY)
    shapes[U.PREFIX + "out.2.weight"] = (4, 9, 3, 3)
    with pytest.raises(ValueError, match="keys differ"):
        U.config_from_shapes(shapes, num_heads=2, norm_num_groups=4)


# ------------------------------------------------------------------------------------------------ parity

TINY_CLASS = dataclasses.replace(U.TINY, num_classes=5)
TINY_SD2 = dataclasses.replace(U.TINY, num_heads=-1, num_head_channels=4, use_linear_in_transformer=True,
                               transformer_depth=2)
TINY_3LEVEL = U.UNetConfig(in_channels=3, out_channels=2, model_channels=8, channel_mult=(1, 2, 3),
                           attention_resolutions=(1, 4), num_res_blocks=2, num_heads=2, context_dim=6,
                           norm_num_groups=4)


def _pair(cfg, dtype, seed=0):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
    randomize_(ref, seed)
    ref = ref.to(torch.float64 if dtype == np.float64 else torch.float32)
    model = U.UNet(cfg, params=unet_params_from_diffusers(state_numpy(ref, dtype), cfg, dtype), dtype=dtype)
    return ref, model


def _inputs(cfg, rng, dtype, N=3, H=8, W=12, S=5):
    x = rng.standard_normal((N, cfg.in_channels, H, W)).astype(dtype)
    t = np.array([1.0, 500.0, 999.0][:N])
    ctx = None if cfg.context_dim is None else rng.standard_normal((N, S, cfg.context_dim)).astype(dtype)
    y = None if cfg.num_classes is None else rng.integers(0, cfg.num_classes, N)
    return x, t, ctx, y


def _torch_run(ref, x, t, ctx, y, dout=None):
    import torch
    tx = torch.tensor(x, requires_grad=True)
    tc = torch.tensor(ctx, requires_grad=True)
    out = ref(tx, torch.tensor(t), tc, class_labels=None if y is None else torch.tensor(y)).sample
    if dout is None:
        return out.detach().numpy(), None, None, None
    ref.zero_grad()
    out.backward(torch.tensor(dout))
    grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}
    return out.detach().numpy(), tx.grad.numpy(), tc.grad.numpy(), grads


@pytest.mark.parametrize("cfg", [U.TINY, TINY_CLASS, TINY_SD2, TINY_3LEVEL], ids=["tiny", "class", "sd2", "3level"])
def test_forward_and_gradients_match_diffusers_float32(rng, cfg):
    ref, model = _pair(cfg, np.float32)
    x, t, ctx, y = _inputs(cfg, rng, np.float32)
    out, cache = model.forward(x, t, ctx, y, keep_cache=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    r_out, r_dx, r_dctx, r_grads = _torch_run(ref, x, t, ctx, y, dout)
    assert rel_error(out, r_out) < 1e-4
    dx, dctx = model.backward(dout, cache)
    assert rel_error(dx, r_dx) < 1e-4
    assert rel_error(dctx, r_dctx) < 1e-4
    mapping = names.unet_ldm_to_diffusers(cfg)
    assert set(model.params.grads) == set(model.params.keys())  # every parameter received a gradient
    worst, where = worst_grad_error(model.params.grads, r_grads, mapping)
    assert worst < 1e-4, where


def _timestep_embedding_float64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                                scale=1, max_period=10000):
    """diffusers computes the sinusoidal embedding in float32 whatever the model dtype; for a float64 comparison
    the reference gets this float64 version of the same formula (written here, independent of minisd)."""
    import math
    import torch
    half = embedding_dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift))
    args = scale * timesteps[:, None].double() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


@pytest.mark.parametrize("cfg", [U.TINY, TINY_SD2], ids=["tiny", "sd2"])
def test_forward_and_gradients_match_diffusers_float64(rng, cfg, monkeypatch):
    import diffusers.models.embeddings as emb
    monkeypatch.setattr(emb, "get_timestep_embedding", _timestep_embedding_float64)
    ref, model = _pair(cfg, np.float64)
    x, t, ctx, y = _inputs(cfg, rng, np.float64)
    out, cache = model.forward(x, t, ctx, y, keep_cache=True)
    dout = rng.standard_normal(out.shape)
    r_out, r_dx, r_dctx, r_grads = _torch_run(ref, x, t, ctx, y, dout)
    assert rel_error(out, r_out) < 1e-9
    dx, dctx = model.backward(dout, cache)
    assert rel_error(dx, r_dx) < 1e-9 and rel_error(dctx, r_dctx) < 1e-9
    mapping = names.unet_ldm_to_diffusers(cfg)
    worst, where = worst_grad_error(model.params.grads, r_grads, mapping)
    assert worst < 1e-9, where


def test_inference_mode_equals_training_mode(rng):
    model = U.UNet(U.TINY, rng=rng)
    x, t, ctx, _ = _inputs(U.TINY, rng, np.float32)
    a, cache = model.forward(x, t, ctx)
    b, _ = model.forward(x, t, ctx, keep_cache=True)
    assert cache is None
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ finite differences

@pytest.mark.parametrize("cfg", [TINY_CLASS, TINY_SD2, dataclasses.replace(U.TINY, context_dim=None)],
                         ids=["class", "sd2", "self-attn-only"])
def test_gradcheck_float64_every_parameter_group(rng, cfg):
    """Central differences on 2 random entries of every parameter tensor, plus x and the context."""
    model = U.UNet(cfg, rng=np.random.default_rng(1), dtype=np.float64)
    for k in model.params.keys():  # replace SD's zero-initialised layers so every path carries signal
        model.params.data[k] = model.params.data[k] + 0.1 * rng.standard_normal(model.params.data[k].shape)
    x, t, ctx, y = _inputs(cfg, rng, np.float64, N=2, H=4, W=6, S=3)
    out, cache = model.forward(x, t, ctx, y, keep_cache=True)
    dout = rng.standard_normal(out.shape)
    dx, dctx = model.backward(dout, cache)

    def loss():
        return np.sum(model.forward(x, t, ctx, y)[0] * dout)

    def fd(arr, idx, h=1e-6):
        old = arr[idx]
        arr[idx] = old + h
        lp = loss()
        arr[idx] = old - h
        lm = loss()
        arr[idx] = old
        return (lp - lm) / (2 * h)

    errs = []
    for k, p in model.params.data.items():
        g = model.params.grads[k]
        for _ in range(2):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            num = fd(p, idx)
            errs.append((abs(num - g[idx]) / max(1e-3, np.abs(g).max()), k))
    assert max(errs)[0] < 1e-6, max(errs)
    assert rel_error(dx, numerical_gradient(lambda: model.forward(x, t, ctx, y)[0], x, dout)) < 1e-6
    if ctx is not None:
        assert rel_error(dctx, numerical_gradient(lambda: model.forward(x, t, ctx, y)[0], ctx, dout)) < 1e-6


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_messages(rng):
    model = U.UNet(U.TINY, rng=rng)
    x, t, ctx, _ = _inputs(U.TINY, rng, np.float32)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.forward(x[:, :, :7], t, ctx)
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\)"):
        model.forward(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="context must be"):
        model.forward(x, t, ctx[:, :, :5])
    with pytest.raises(ValueError, match="pass context"):
        model.forward(x, t, None)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.forward(bad, t, ctx)
    with pytest.raises(ValueError, match="keep_cache=True"):
        model.backward(np.zeros((3, 4, 8, 12), np.float32), None)


# ------------------------------------------------------------------------------------------------ full size (slow)

@pytest.mark.slow
@pytest.mark.parametrize("which", ["SD15", "SD21"])
def test_full_size_random_weights_match_diffusers(which):
    """The real SD 1.5 / 2.1 U-Net architecture with random weights: same output as diffusers (16x16 latent to
    keep CI time reasonable; every layer, head count and skip connection is the full-size one)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    cfg = U.PRESETS[which]
    ref, model = _pair(cfg, np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, cfg.context_dim)).astype(np.float32)
    t = np.array([421.0])
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        r = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    out, _ = model.forward(x, t, ctx)
    assert rel_error(out, r) < 1e-4

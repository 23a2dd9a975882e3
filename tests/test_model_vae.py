"""VAE: key set and parameter count, parity with diffusers' AutoencoderKL (encoder moments, decoder, every
gradient), float64 finite differences, posterior and KL gradients, tiled decode, bad input."""
import dataclasses

import numpy as np
import pytest

from minisd.models import vae as V
from minisd.testing import numerical_gradient, rel_error

from refmodels import diffusers_vae_config, randomize_, state_numpy, vae_params_from_diffusers, worst_grad_error
from test_model_unet import read_keys
from weights_convert import names


def test_parameter_count_matches_published():
    assert sum(int(np.prod(s)) for s in V.param_shapes(V.SD).values()) == 83_653_863


def test_keys_equal_checkpoint_key_list(shared_dir):
    for which in ("sd1", "sd2"):
        ref = read_keys(shared_dir / f"data/sd_keys/{which}_ldm_expected_keys.txt", V.PREFIX)
        assert V.param_shapes(V.SD) == ref
        assert V.config_from_shapes(ref) == V.SD


TINY3 = V.VAEConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, norm_num_groups=4, resolution=16)


def _pair(cfg, dtype):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = randomize_(diffusers.AutoencoderKL(**diffusers_vae_config(cfg)), 0)
    ref = ref.to(torch.float64 if dtype == np.float64 else torch.float32)
    return ref, V.VAE(cfg, params=vae_params_from_diffusers(state_numpy(ref, dtype), cfg, dtype), dtype=dtype)


@pytest.mark.parametrize("cfg,dtype,tol", [(V.TINY, np.float32, 1e-4), (TINY3, np.float32, 1e-4),
                                           (TINY3, np.float64, 1e-9)], ids=["tiny-f32", "3level-f32", "3level-f64"])
def test_encoder_decoder_and_gradients_match_diffusers(rng, cfg, dtype, tol):
    import torch
    ref, model = _pair(cfg, dtype)
    x = rng.standard_normal((3, 3, 12, 8)).astype(dtype)  # non-square, batch 3
    tx = torch.tensor(x, requires_grad=True)
    dist = ref.encode(tx).latent_dist
    post, cache = model.encode(x, keep_cache=True)
    assert rel_error(post.mean, dist.mean.detach().numpy()) < tol
    assert rel_error(post.logvar, dist.logvar.detach().numpy()) < tol
    # encoder gradients through mean and logvar
    dm = rng.standard_normal(post.mean.shape).astype(dtype)
    dl = rng.standard_normal(post.logvar.shape).astype(dtype)
    ref.zero_grad()
    (dist.mean * torch.tensor(dm)).sum().add((dist.logvar * torch.tensor(dl)).sum()).backward()
    dx = model.encode_backward(V.posterior_backward(post, dmean=dm, dlogvar=dl), cache)
    assert rel_error(dx, tx.grad.numpy()) < tol
    mapping = names.vae_ldm_to_diffusers(cfg)
    r_grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}
    enc = [k for k in model.params.grads]
    assert all(".encoder." in k or "quant_conv" in k for k in enc)
    worst, where = worst_grad_error(model.params.grads, r_grads, mapping)
    assert worst < tol, where
    # decoder
    model.params.zero_grad()
    z = rng.standard_normal((2, cfg.embed_dim, 3, 5)).astype(dtype)
    tz = torch.tensor(z, requires_grad=True)
    r_img = ref.decode(tz).sample
    img, dcache = model.decode(z, keep_cache=True)
    assert rel_error(img, r_img.detach().numpy()) < tol
    dy = rng.standard_normal(img.shape).astype(dtype)
    ref.zero_grad()
    r_img.backward(torch.tensor(dy))
    dz = model.decode_backward(dy, dcache)
    assert rel_error(dz, tz.grad.numpy()) < tol
    r_grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}
    dec = list(model.params.grads)
    assert len(dec) == sum(1 for k in model.params.keys() if ".decoder." in k or "post_quant" in k)
    worst, where = worst_grad_error(model.params.grads, r_grads, mapping)
    assert worst < tol, where


def test_gradcheck_float64(rng):
    model = V.VAE(V.TINY, rng=np.random.default_rng(2), dtype=np.float64)
    x = rng.standard_normal((2, 3, 4, 6))
    noise = rng.standard_normal((2, 4, 2, 3))

    def pipeline():  # encode -> sample -> decode, plus the KL, as VAE training uses them
        post, _ = model.encode(x)
        return model.decode(post.sample(noise=noise))[0]

    dy = rng.standard_normal((2, 3, 4, 6))
    post, ec = model.encode(x, keep_cache=True)
    img, dc = model.decode(post.sample(noise=noise), keep_cache=True)
    dz = model.decode_backward(dy, dc)
    dx = model.encode_backward(V.posterior_backward(post, dsample=dz, noise=noise), ec)
    assert rel_error(dx, numerical_gradient(pipeline, x, dy)) < 1e-6
    # parameter gradients: a few entries of every tensor
    for k, p in model.params.data.items():
        g = model.params.grads[k]
        idx = tuple(rng.integers(0, s) for s in p.shape)
        old = p[idx]
        p[idx] = old + 1e-6
        lp = np.sum(pipeline() * dy)
        p[idx] = old - 1e-6
        lm = np.sum(pipeline() * dy)
        p[idx] = old
        assert abs((lp - lm) / 2e-6 - g[idx]) < 1e-6 * max(1.0, np.abs(g).max()), k


def test_kl_and_clamp_gradients(rng):
    moments = rng.standard_normal((2, 8, 3, 3))
    moments[0, 5, 0, 0] = -40.0  # logvar below the clamp (-30): no gradient there
    dkl = np.array([0.3, -1.2])

    def kl():
        return V.posterior_from_moments(moments).kl()

    post = V.posterior_from_moments(moments)
    g = V.posterior_backward(post, dkl=dkl)
    assert rel_error(g, numerical_gradient(kl, moments, dkl)) < 1e-6
    assert g[0, 5, 0, 0] == 0.0
    # independent formula for the KL of a diagonal Gaussian against N(0, I)
    mean, logvar = moments[:, :4], np.clip(moments[:, 4:], -30, 20)
    ref = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    assert rel_error(post.kl(), ref) < 1e-12


def test_tiled_decode_blends_exactly(rng, monkeypatch):
    """Tiling machinery: with a *local* decoder (each output pixel depends only on its own latent pixel) tiled
    decoding must equal a full decode exactly, for tiles that do not divide the image and odd overlaps. (With the
    real decoder tiles differ slightly, because GroupNorm sees per-tile statistics; diffusers' tiling too.)"""
    model = V.VAE(V.TINY, rng=np.random.default_rng(3))
    f = model.config.downsample_factor

    def local_decode(z, **kw):  # nearest upsample by f of a pointwise function of z
        img = np.tanh(z[:, :3] * 0.7 + z[:, 3:4])
        return img.repeat(f, axis=2).repeat(f, axis=3), None

    z = rng.standard_normal((2, 4, 13, 22)).astype(np.float64)
    full = local_decode(z)[0]
    monkeypatch.setattr(model, "decode", local_decode)
    for tile, overlap in [(8, 4), (6, 1), (9, 3), (13, 5)]:
        np.testing.assert_allclose(model.decode_tiled(z, tile=tile, overlap=overlap), full, rtol=1e-12, atol=1e-12)


def test_tiled_decode_single_tile_equals_full(rng):
    model = V.VAE(V.TINY, rng=np.random.default_rng(3))
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.decode_tiled(z, tile=8, overlap=4), model.decode(z)[0], rtol=1e-6, atol=1e-6)
    tiled = model.decode_tiled(rng.standard_normal((1, 4, 12, 20)).astype(np.float32), tile=8, overlap=4)
    assert tiled.shape == (1, 3, 24, 40) and np.isfinite(tiled).all()


def test_bad_input(rng):
    model = V.VAE(V.TINY, rng=rng)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(np.zeros((1, 3, 5, 4), np.float32))
    with pytest.raises(ValueError, match=r"z must be \(N, 4, h, w\)"):
        model.decode(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        model.decode(np.full((1, 4, 2, 2), np.inf, np.float32))


@pytest.mark.slow
def test_full_size_random_weights_match_diffusers():
    torch = pytest.importorskip("torch")
    ref, model = _pair(V.SD, np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 64, 48)).astype(np.float32)
    z = rng.standard_normal((1, 4, 8, 6)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.tensor(x)).latent_dist
        r_img = ref.decode(torch.tensor(z)).sample.numpy()
    post, _ = model.encode(x)
    assert rel_error(post.mean, dist.mean.numpy()) < 1e-4
    assert rel_error(post.logvar, dist.logvar.numpy()) < 1e-4
    assert rel_error(model.decode(z)[0], r_img) < 1e-4


def test_presets_construct():
    for name, cfg in V.PRESETS.items():
        assert V.config_from_shapes(V.param_shapes(cfg), resolution=cfg.resolution, scale_factor=cfg.scale_factor,
                                    norm_num_groups=cfg.norm_num_groups) == dataclasses.replace(cfg)

"""Whole models on the GPU path: the U-Net (forward and backward), the VAE decoder and the CLIP text encoder with
every hot op (conv2d, attention, GroupNorm, LayerNorm, GEGLU) running its CUDA kernel in the emulator, against the
same model on the NumPy ops.

Configs are tiny but shaped like SD 1.5: U-Net TINY (2 levels, cross-attention at the second, 2 heads of d = 8) and
a 2-level variant with self- and cross-attention at both levels, one head of d = 40 and 80 (SD 1.5's head dims),
linear proj_in/out (SD 2.x), batch 2, 8x8 latents, 5 context tokens; the VAE decoder TINY (its mid-block attention:
one head of d = 16); CLIP TINY (causal attention). Parameters are random (no zero-initialised layer, which would
hide a broken path), norms near 1.

References: the same model with the CUDA dispatch switched off (NumPy ops, float32). Tolerance: rel_error
(max |a - b| / max |b|) < 1e-5 per output and per gradient tensor: float32 rounding differs between the two paths
(summation order inside the kernels and BLAS) and accumulates through the layers; measured <= 2e-6.
Every test checks that the kernels really ran (the modules the launcher loaded).
"""
import dataclasses

import numpy as np
import pytest

import minisd.cuda
from minisd import backend
from minisd.cuda import launch
from minisd.models import clip as C
from minisd.models import unet as U
from minisd.models import vae as V
from minisd.testing import rel_error

from cuda_testing import HAVE_CXX, SANITIZE

pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="the CUDA emulator needs g++")

XATTN2 = U.UNetConfig(in_channels=4, out_channels=4, model_channels=40, channel_mult=(1, 2),
                      attention_resolutions=(1, 2), num_res_blocks=1, num_heads=1, context_dim=24,
                      use_linear_in_transformer=True, norm_num_groups=8)
UNETS = {"TINY": U.TINY, "XATTN2": XATTN2}
HOT = {"conv2d", "attention", "groupnorm", "layernorm", "geglu"}
TOL = 1e-5


def randomize(params, rng):
    """Every parameter random: weights N(0, 1/fan_in), biases 0.1 N(0, 1), norm scales 1 + 0.1 N(0, 1)."""
    for k, a in params.data.items():
        if a.ndim == 1:
            norm_scale = k.endswith(".weight")  # 1-D weights are GroupNorm/LayerNorm scales
            a[...] = (1.0 if norm_scale else 0.0) + 0.1 * rng.standard_normal(a.shape)
        else:
            a[...] = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[1:]))
    return params


@pytest.fixture
def kernels_used(monkeypatch):
    """The kernel files (conv2d, attention, ...) whose modules the launcher fetched during the test."""
    used = set()
    real = launch.get_module

    def spy(source_name, target):
        used.add(source_name)
        return real(source_name, target)

    monkeypatch.setattr(launch, "get_module", spy)
    return used


def both_paths(fn):
    """fn() on the NumPy ops and on the emulated kernels: (numpy result, cuda result)."""
    with minisd.cuda.emulate(enabled=False):
        ref = fn()
    with minisd.cuda.emulate(sanitize=SANITIZE):
        got = fn()
    return ref, got


def _unet(cfg, rng):
    model = U.UNet(cfg, rng=rng)
    randomize(model.params, rng)
    N, H, W, S = 2, 8, 8, 5
    x = rng.standard_normal((N, cfg.in_channels, H, W)).astype(np.float32)
    t = np.array([3.0, 801.0])
    ctx = rng.standard_normal((N, S, cfg.context_dim)).astype(np.float32)
    return model, x, t, ctx


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_forward(rng, kernels_used, name):
    model, x, t, ctx = _unet(UNETS[name], rng)
    ref, got = both_paths(lambda: model.forward(x, t, ctx)[0])
    assert HOT <= kernels_used, kernels_used
    assert np.isfinite(got).all() and got.dtype == np.float32
    assert rel_error(got, ref) < TOL, rel_error(got, ref)


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_backward(rng, kernels_used, name):
    """dx, dcontext and every parameter gradient of a training step, kernels vs NumPy ops."""
    model, x, t, ctx = _unet(UNETS[name], rng)
    dout = rng.standard_normal(x.shape[:1] + (model.config.out_channels,) + x.shape[2:]).astype(np.float32)

    def step():
        model.params.zero_grad()
        out, cache = model.forward(x, t, ctx, keep_cache=True)
        dx, dctx = model.backward(dout, cache)
        return out, dx, dctx, dict(model.params.grads)

    (out0, dx0, dctx0, g0), (out1, dx1, dctx1, g1) = both_paths(step)
    assert HOT <= kernels_used, kernels_used
    assert rel_error(out1, out0) < TOL
    assert rel_error(dx1, dx0) < TOL, rel_error(dx1, dx0)
    assert rel_error(dctx1, dctx0) < TOL, rel_error(dctx1, dctx0)
    assert set(g1) == set(g0) == set(model.params.keys())
    worst = max(g0, key=lambda k: rel_error(g1[k], g0[k]))
    assert rel_error(g1[worst], g0[worst]) < TOL, (worst, rel_error(g1[worst], g0[worst]))


def test_vae_decoder(rng, kernels_used):
    model = V.VAE(V.TINY, rng=rng)
    randomize(model.params, rng)
    z = rng.standard_normal((2, V.TINY.embed_dim, 4, 6)).astype(np.float32)
    ref, got = both_paths(lambda: model.decode(z)[0])
    assert {"conv2d", "attention", "groupnorm"} <= kernels_used, kernels_used
    assert got.shape == (2, V.TINY.out_ch, 8, 12) and rel_error(got, ref) < TOL, rel_error(got, ref)


@pytest.mark.parametrize("cfg", [C.TINY, dataclasses.replace(C.TINY_OPENCLIP, projection_dim=None)],
                         ids=["hf", "openclip"])
def test_clip_text_encoder(rng, kernels_used, cfg):
    model = C.CLIPTextModel(cfg, rng=rng)
    randomize(model.params, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    ref, got = both_paths(lambda: model.forward(ids)[0])
    assert {"attention", "layernorm"} <= kernels_used, kernels_used
    assert rel_error(got, ref) < TOL, rel_error(got, ref)


# ----------------------------------------------------------------------------------------------------------------
# the same models on device arrays: the CuPy code path (launchers, models, backend switch) through tests/fake_cupy.py,
# a CuPy stand-in that refuses every implicit host/device mix (np.zeros meeting a device array, np.asarray of one)
# and runs the kernels in the emulator; and on a real GPU with real CuPy (marker gpu)

DEVICES = [pytest.param("fake", id="fake_cupy"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device_xp(request, monkeypatch):
    """The array module of the device arrays: the CuPy stand-in, or real CuPy on a GPU. Outputs NaN-poisoned."""
    monkeypatch.setenv("MINISD_CUDA_POISON", "1")
    monkeypatch.delenv("MINISD_CUDA_EMULATE", raising=False)
    if request.param == "fake":
        import fake_cupy
        return fake_cupy.install(monkeypatch)
    import cupy
    return cupy


def _host(a):
    return a.get() if hasattr(a, "get") else a


def _on(xp, params):
    """A copy of params on the device (the host model keeps its own arrays)."""
    from minisd.nn import Params
    return Params(dict(params.data), compute_dtype=params.compute_dtype).to(xp)


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_on_device_arrays(rng, device_xp, name):
    """Forward and backward with every array on the device; vs the NumPy model."""
    xp = device_xp
    model, x, t, ctx = _unet(UNETS[name], rng)
    dout = rng.standard_normal(x.shape[:1] + (model.config.out_channels,) + x.shape[2:]).astype(np.float32)
    with minisd.cuda.emulate(enabled=False):
        out0, cache = model.forward(x, t, ctx, keep_cache=True)
        dx0, dctx0 = model.backward(dout, cache)
        g0 = dict(model.params.grads)
    dev = U.UNet(model.config, params=_on(xp, model.params))
    out1, cache = dev.forward(xp.asarray(x), t, xp.asarray(ctx), keep_cache=True)
    dx1, dctx1 = dev.backward(xp.asarray(dout), cache)
    assert backend.is_cuda(out1) and backend.is_cuda(dx1) and backend.is_cuda(dctx1)
    assert rel_error(_host(out1), out0) < TOL
    assert rel_error(_host(dx1), dx0) < TOL and rel_error(_host(dctx1), dctx0) < TOL
    assert set(dev.params.grads) == set(g0)
    for k, g in dev.params.grads.items():
        assert backend.is_cuda(g) and rel_error(_host(g), g0[k]) < TOL, k


def test_vae_and_clip_on_device_arrays(rng, device_xp):
    xp = device_xp
    vae = V.VAE(V.TINY, rng=rng)
    randomize(vae.params, rng)
    z = rng.standard_normal((2, V.TINY.embed_dim, 4, 6)).astype(np.float32)
    img = rng.standard_normal((1, V.TINY.in_channels, 8, 8)).astype(np.float32)
    with minisd.cuda.emulate(enabled=False):
        ref = vae.decode(z)[0]
        ref_tiled = vae.decode_tiled(z, tile=4, overlap=2)
        ref_mean = vae.encode(img)[0].mean
    dev = V.VAE(V.TINY, params=_on(xp, vae.params))
    assert rel_error(_host(dev.decode(xp.asarray(z))[0]), ref) < TOL
    assert rel_error(_host(dev.decode_tiled(xp.asarray(z), tile=4, overlap=2)), ref_tiled) < TOL
    assert rel_error(_host(dev.encode(xp.asarray(img))[0].mean), ref_mean) < TOL
    for cfg in (C.TINY, dataclasses.replace(C.TINY_OPENCLIP, projection_dim=None)):
        clip = C.CLIPTextModel(cfg, rng=rng)
        randomize(clip.params, rng)
        ids = rng.integers(0, cfg.vocab_size, (2, 9))
        dh = rng.standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
        with minisd.cuda.emulate(enabled=False):
            h0, cache = clip.forward(ids, keep_cache=True)
            clip.backward(dh, cache)
            g0 = dict(clip.params.grads)
        dclip = C.CLIPTextModel(cfg, params=_on(xp, clip.params))
        h1, cache = dclip.forward(ids, keep_cache=True)  # token ids stay on the host
        dclip.backward(xp.asarray(dh), cache)
        assert rel_error(_host(h1), h0) < TOL
        assert set(dclip.params.grads) == set(g0)
        scale = max(np.abs(g).max() for g in g0.values())
        for k, g in dclip.params.grads.items():
            if k.endswith("k_proj.bias"):
                # exactly zero in exact arithmetic (a key bias adds q.b to a whole score row; softmax ignores
                # it), so both paths return rounding noise: check that it is noise on the model's gradient scale
                assert np.abs(_host(g)).max() < TOL * scale and np.abs(g0[k]).max() < TOL * scale, k
            else:
                assert rel_error(_host(g), g0[k]) < TOL, k


def test_gpu_benchmark_runs_in_the_emulator():
    """benchmarks/gpu.py --smoke: the conv / attention / unet sections validate (rel err column) and print a row
    per case without a GPU, so the script gpu_check.sh runs on a GPU is known to work before it gets there."""
    import subprocess
    import sys
    from cuda_testing import REPO
    pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--only", "conv", "attention", "unet"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for op in ("conv3x3/1 fwd", "conv3x3/2 bwd", "attention cross fwd", "attention cross bwd", "unet TINY step",
               "unet TINY train"):
        assert op in r.stdout, r.stdout
    assert "FAILED" not in r.stdout

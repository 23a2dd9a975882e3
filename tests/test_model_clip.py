"""CLIP text encoder: key sets and counts (SD1 CLIP-L, SD2 OpenCLIP-H), parity with transformers' CLIPTextModel
(hidden states and every gradient), the OpenCLIP layout through diffusers' conversion rule, clip_skip, float64
finite differences, textual-inversion rows, bad input."""
import dataclasses

import numpy as np
import pytest

from minisd.models import clip as C
from minisd.testing import rel_error

from refmodels import (clip_params_from_transformers, randomize_, state_numpy, transformers_clip_config,
                       worst_grad_error, grads_numpy, load_into)
from test_model_unet import read_keys
from weights_convert import names


def test_parameter_count_matches_published():
    assert sum(int(np.prod(s)) for s in C.param_shapes(C.SD15).values()) == 123_060_480
    # OpenCLIP-H text: 352,984,064 for the 24 layers + embeddings + ln_final, plus projection and logit_scale
    assert sum(int(np.prod(s)) for s in C.param_shapes(C.SD21).values()) == 352_984_064 + 1024 * 1024 + 1


@pytest.mark.parametrize("which,cfg", [("sd1", C.SD15), ("sd2", C.SD21)])
def test_keys_equal_checkpoint_key_list(shared_dir, which, cfg):
    ref = read_keys(shared_dir / f"data/sd_keys/{which}_ldm_expected_keys.txt", "cond_stage_model.")
    assert C.param_shapes(cfg) == ref
    assert C.config_from_shapes(ref) == cfg


def _ids(rng, N=3, L=77, V=49408):
    ids = np.full((N, L), 49407, dtype=np.int64)
    for i in range(N):
        n = int(rng.integers(1, L - 2))
        ids[i, 0] = 49406
        ids[i, 1:1 + n] = rng.integers(0, V - 2, n)  # EOS padding after the content, as SD1 pads
    return ids


def _hf_pair(cfg, dtype, layers=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers_clip_config(cfg if layers is None else dataclasses.replace(cfg, num_hidden_layers=layers))
    torch.manual_seed(0)
    ref = randomize_(transformers.CLIPTextModel(hf_cfg), 0)
    return ref.to(torch.float64 if dtype == np.float64 else torch.float32)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_hf_layout_matches_transformers_with_gradients(rng, dtype, tol, monkeypatch):
    import torch
    if dtype == np.float64:
        # transformers' eager CLIP attention forces its softmax to float32 (softmax(..., dtype=torch.float32));
        # a float64 comparison needs the reference to stay in float64 throughout.
        orig = torch.nn.functional.softmax
        monkeypatch.setattr(torch.nn.functional, "softmax",
                            lambda x, dim=None, dtype=None, **kw: orig(x, dim=dim, dtype=None if x.dtype ==
                                                                       torch.float64 else dtype, **kw))
    cfg = C.TINY
    ref = _hf_pair(cfg, dtype)
    model = C.CLIPTextModel(cfg, params=clip_params_from_transformers(state_numpy(ref, dtype), cfg, dtype),
                            dtype=dtype)
    ids = _ids(rng, L=9)
    h, cache = model.forward(ids, keep_cache=True)
    out = ref(torch.tensor(ids), output_hidden_states=True)
    assert rel_error(h, out.last_hidden_state.detach().numpy()) < tol
    dh = rng.standard_normal(h.shape).astype(dtype)
    ref.zero_grad()
    out.last_hidden_state.backward(torch.tensor(dh))
    model.backward(dh, cache)
    mapping = names.clip_ldm_to_transformers(cfg)
    r = grads_numpy(ref)
    assert set(model.params.grads) == set(model.params.keys())
    worst, where = worst_grad_error(model.params.grads, r, mapping)
    assert worst < tol, where


def test_clip_skip_matches_diffusers_rule(rng):
    """diffusers' clip_skip=k: hidden_states[-(k+1)] then final_layer_norm."""
    import torch
    cfg = dataclasses.replace(C.TINY, num_hidden_layers=3)
    ref = _hf_pair(cfg, np.float32)
    model = C.CLIPTextModel(cfg, params=clip_params_from_transformers(state_numpy(ref), cfg))
    ids = _ids(rng, L=7)
    with torch.no_grad():
        hs = ref(torch.tensor(ids), output_hidden_states=True).hidden_states
        for k in (1, 2):
            final_ln = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
            want = final_ln(hs[-(k + 1)]).numpy()
            assert rel_error(model.forward(ids, clip_skip=k)[0], want) < 1e-5


def test_openclip_layout_equals_converted_transformers_model(rng):
    """SD2: penultimate layer + ln_final in OpenCLIP layout == diffusers' converted CLIPTextModel (which drops
    the last layer and splits in_proj by rows)."""
    import torch
    cfg = C.TINY_OPENCLIP
    model = C.CLIPTextModel(cfg, rng=np.random.default_rng(4))
    hf_state = names.openclip_to_hf_tensors(model.params.state_dict(), cfg)
    ref = _hf_pair(dataclasses.replace(cfg, layout="hf", clip_skip=0, projection_dim=None), np.float32,
                   layers=cfg.num_hidden_layers - 1)
    missing, unexpected = load_into(ref, hf_state)
    assert not unexpected and all("position_ids" in k for k in missing)
    ids = _ids(rng, L=11)
    ids[:, 5:][ids[:, 5:] == 49407] = 0  # SD2 pads with 0 after the first EOS
    with torch.no_grad():
        want = ref(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_error(model.forward(ids)[0], want) < 1e-5


def test_openclip_gradcheck_float64_and_projection(rng):
    cfg = C.TINY_OPENCLIP
    model = C.CLIPTextModel(cfg, rng=np.random.default_rng(5), dtype=np.float64)
    ids = _ids(rng, N=2, L=6)
    h, cache = model.forward(ids, keep_cache=True)
    pooled, idx = model.pooled(h, ids)
    feats, pc = model.project(pooled)
    dfeat = rng.standard_normal(feats.shape)
    dpooled = model.project_backward(dfeat, pc)
    dh = np.zeros_like(h)
    dh[np.arange(len(ids)), idx] = dpooled
    model.backward(dh, cache)

    def loss():
        hh = model.forward(ids)[0]
        return np.sum(model.project(model.pooled(hh, ids)[0])[0] * dfeat)

    for k, p in model.params.data.items():
        if k.endswith("logit_scale"):
            continue
        g = model.params.grads.get(k)
        for _ in range(2):
            i = tuple(rng.integers(0, s) for s in p.shape)
            old = p[i]
            p[i] = old + 1e-6
            lp = loss()
            p[i] = old - 1e-6
            lm = loss()
            p[i] = old
            num = (lp - lm) / 2e-6
            got = 0.0 if g is None else g[i]
            assert abs(num - got) < 1e-6 * max(1.0, 0 if g is None else np.abs(g).max()), k


def test_textual_inversion_rows(rng):
    model = C.CLIPTextModel(C.TINY, rng=rng)
    new = model.add_token_embeddings(rng.standard_normal((2, 12)))
    assert new == [49408, 49409] and model.config.vocab_size == 49410
    ids = _ids(rng, N=1, L=5)
    ids[0, 1] = 49409
    h, _ = model.forward(ids)
    assert h.shape == (1, 5, 12)
    with pytest.raises(ValueError, match="width 768"):
        model.add_token_embeddings(np.zeros(7))


def test_bad_input(rng):
    model = C.CLIPTextModel(C.TINY, rng=rng)
    with pytest.raises(ValueError, match="L <= 77"):
        model.forward(np.zeros((1, 78), np.int64))
    with pytest.raises(ValueError, match="clip_skip"):
        model.forward(np.zeros((1, 5), np.int64), clip_skip=2)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 49408\)"):
        model.forward(np.full((1, 5), 49408, np.int64))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["SD15", "SD21"])
def test_full_size_random_weights_match_transformers(which):
    import torch
    cfg = C.PRESETS[which]
    rng = np.random.default_rng(0)
    ids = _ids(rng, N=2)
    if cfg.layout == "hf":
        ref = _hf_pair(cfg, np.float32)
        model = C.CLIPTextModel(cfg, params=clip_params_from_transformers(state_numpy(ref), cfg))
    else:
        model = C.CLIPTextModel(cfg, rng=rng)
        ref = _hf_pair(dataclasses.replace(cfg, layout="hf", clip_skip=0, projection_dim=None), np.float32,
                       layers=cfg.num_hidden_layers - 1)
        hf = names.openclip_to_hf_tensors(model.params.state_dict(), cfg)
        load_into(ref, hf)
        ids[:, 40:] = 0
    with torch.no_grad():
        want = ref(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_error(model.forward(ids)[0], want) < 1e-4

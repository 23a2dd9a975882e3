"""weights_convert: detection, single-file and diffusers-folder loading, EMA, dtypes, minisd's own format, and clear
errors for everything else.

References are independent of the code under test: the tiny models are built by diffusers/transformers
(tests/fixtures/make_sd_fixtures.py), written to the LDM single-file layout by the fixture's own rename rules
(checked by diffusers' converters reading the file back), and every tensor minisd loads is compared with the
diffusers model's tensor it must equal. The full SD 1.x/2.x key sets come from ../shared/data/sd_keys.
"""
import json
import os
import pickle
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minisd.errors import UserError
from weights_convert import detect as det
from weights_convert.convert import convert
from weights_convert.load import load_model
from weights_convert.single_file import build_model, select_weights

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
fx = pytest.importorskip("make_sd_fixtures")


def read_keys(path):
    out = {}
    for line in open(path):
        k, shape = line.split(" ", 1)
        out[k] = tuple(int(s) for s in shape.strip()[1:-1].split(",") if s.strip())
    return out


# ------------------------------------------------------------------------------------------------ tiny fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (components, LDM state, folder)} with the single file in several forms and diffusers folders."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = {}
    for family in ("sd1", "sd2"):
        d = tmp_path_factory.mktemp(family)
        comps = fx.components(family)
        state = fx.to_ldm_state_dict(comps)
        fx.save_safetensors(state, d / "model.safetensors")
        fx.save_ckpt(fx.with_extras(state), d / "model.ckpt", global_step=470000 if family == "sd1" else 110000)
        fx.save_diffusers(comps, d / "diffusers")
        fx.save_diffusers(comps, d / "diffusers_fp16", fp16=True)
        out[family] = (comps, state, d)
    return out


def assert_same_weights(model, state, exact=True, dtype=None):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, ref in state.items():
        a = got[k]
        want = ref if dtype is None else ref.astype(dtype)
        assert a.shape == want.shape, k
        if exact:
            assert a.dtype == want.dtype, (k, a.dtype, want.dtype)
            np.testing.assert_array_equal(a, want, err_msg=k)


def test_single_file_layout_is_what_diffusers_reads(tiny):
    """The fixture's LDM file is checked by diffusers itself: its converters give back the model's weights."""
    for family in ("sd1", "sd2"):
        comps, state, d = tiny[family]
        from safetensors.numpy import load_file
        assert fx.diffusers_reads_back(load_file(str(d / "model.safetensors")), comps) == \
            {"unet": 0.0, "vae": 0.0, "text_encoder": 0.0}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("form", ["model.safetensors", "model.ckpt"])
def test_single_files_load_exactly(tiny, family, form):
    comps, state, d = tiny[family]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # schedule buffers / position_ids are expected extras: no warning
        m = load_model(d / form)
    assert_same_weights(m, state)
    assert m.prediction_type == ("epsilon" if family == "sd1" else "v_prediction")
    assert m.scheduler.prediction_type == m.prediction_type
    assert m.tokenizer.pad_id == (49407 if family == "sd1" else 0)
    assert m.default_sampler == ("pndm" if family == "sd1" else "ddim")
    if family == "sd2":
        assert m.text_encoder.config.layout == "openclip" and m.text_encoder.config.clip_skip == 1
        assert m.text_encoder.config.hidden_act == "gelu" and m.unet.config.num_head_channels == 64


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folders_load_exactly(tiny, family):
    """fp32 and fp16 folders: every tensor equals the diffusers model's (renamed through names.py and compared
    against the fixture's independent LDM layout)."""
    comps, state, d = tiny[family]
    m = load_model(d / "diffusers")
    text_prefix = "cond_stage_model.transformer."
    if family == "sd1":
        assert_same_weights(m, state)
    else:
        # SD 2.x folders hold the 23-of-24-layer text encoder in HF layout: U-Net and VAE are identical, the text
        # encoder is compared with transformers' own tensors
        non_text = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
        got = m.state_dict()
        for k, v in non_text.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        tref = {fx.hf_text_key(k): v.numpy() for k, v in comps["text_encoder"].state_dict().items()
                if not k.endswith("position_ids")}
        gtext = {k[len(text_prefix):]: v for k, v in got.items() if k.startswith(text_prefix)}
        assert set(gtext) == set(tref)
        for k in tref:
            np.testing.assert_array_equal(gtext[k], tref[k], err_msg=k)
        assert m.text_encoder.config.layout == "hf" and m.text_encoder.config.clip_skip == 0
        assert m.text_encoder.config.num_hidden_layers == comps["config"]["text"]["num_hidden_layers"]
    assert m.prediction_type == ("epsilon" if family == "sd1" else "v_prediction")
    assert m.tokenizer.pad_id == (49407 if family == "sd1" else 0)
    m16 = load_model(d / "diffusers_fp16")
    for k, a in m16.state_dict().items():
        assert a.dtype == np.float16, k
        np.testing.assert_array_equal(a, m.state_dict()[k].astype(np.float16), err_msg=k)


def test_bin_and_sharded_folders(tiny, tmp_path):
    comps, state, _ = tiny["sd1"]
    fx.save_diffusers(comps, tmp_path / "bin", safe=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert_same_weights(load_model(tmp_path / "bin"), state)
    fx.save_diffusers(comps, tmp_path / "sharded", max_shard_size="150KB")
    assert (tmp_path / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_weights(load_model(tmp_path / "sharded"), state)


def test_fp16_bf16_and_wrappers(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    _, state, _ = tiny["sd1"]
    fx.save_safetensors(state, tmp_path / "h.safetensors", dtype=np.float16)
    m = load_model(tmp_path / "h.safetensors")
    assert_same_weights(m, {k: v.astype(np.float16) for k, v in state.items()})
    fx.save_ckpt(state, tmp_path / "b.ckpt", dtype="bf16")
    m = load_model(tmp_path / "b.ckpt")
    ref = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in state.items()}
    assert_same_weights(m, ref)
    fx.save_ckpt(state, tmp_path / "flat.ckpt", wrap=False)  # no {"state_dict": ...} wrapper
    assert_same_weights(load_model(tmp_path / "flat.ckpt"), state)
    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save({"state_dict": {"state_dict": sd}, "global_step": 1}, tmp_path / "nested.ckpt")
    assert_same_weights(load_model(tmp_path / "nested.ckpt"), state)
    # the legacy (torch < 1.6) non-zip format, as old .pth files have it
    torch.save({"state_dict": sd}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert_same_weights(load_model(tmp_path / "legacy.pth"), state)


def test_ema_extraction(tiny, tmp_path):
    _, state, _ = tiny["sd1"]
    rng = np.random.default_rng(0)
    ema = {k: (v + rng.standard_normal(v.shape).astype(np.float32)) if k.startswith(det.UNET) else v
           for k, v in state.items()}
    fx.save_ckpt(fx.with_extras(state, ema_of=ema), tmp_path / "ema.ckpt")
    assert_same_weights(load_model(tmp_path / "ema.ckpt"), state)  # default: the regular weights (as diffusers)
    assert_same_weights(load_model(tmp_path / "ema.ckpt", extract_ema=True), ema)
    with pytest.raises(UserError, match="no EMA weights"):
        load_model(tiny["sd1"][2] / "model.ckpt", extract_ema=True)


def test_sd2_prediction_type_from_global_step(tiny, tmp_path):
    _, state, _ = tiny["sd2"]
    fx.save_ckpt(state, tmp_path / "base.ckpt", global_step=875000)  # diffusers' rule: the 512-base model
    m = load_model(tmp_path / "base.ckpt")
    assert m.prediction_type == "epsilon" and m.sample_size == 64
    m = load_model(tmp_path / "base.ckpt", prediction_type="v_prediction")
    assert m.prediction_type == "v_prediction"
    assert load_model(tiny["sd2"][2] / "model.safetensors").sample_size == 96  # no global_step: 768-v


# ------------------------------------------------------------------------------------------------ key sets

def _fake_file(keys):
    """A state dict with the given key shapes whose arrays cost no memory (broadcast scalars)."""
    return {k: np.broadcast_to(np.float32(0.0), s) for k, s in keys.items()}


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_loaded_key_set_equals_checkpoint_key_list(shared_dir, which):
    """Feed the exact SD key list (plus EMA shadows, schedule buffers, position_ids) through the single-file
    loader: the loaded key set and shapes equal the list exactly."""
    keys = read_keys(shared_dir / f"data/sd_keys/{which}_ldm_expected_keys.txt")
    tensors = fx.with_extras(_fake_file(keys), ema_of=_fake_file(keys))
    info = det.detect({k: v.shape for k, v in tensors.items()}, global_step=None)
    assert info.family == which and info.has_ema and info.variant == "txt2img"
    model = build_model(select_weights(tensors), info)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    if which == "sd1":
        assert model.unet.config.num_heads == 8 and model.text_encoder.config.num_hidden_layers == 12
    else:
        assert model.unet.config.num_head_channels == 64 and model.text_encoder.config.num_hidden_layers == 24
        assert model.prediction_type == "v_prediction"
    ema_model = build_model(select_weights(tensors, extract_ema=True), info)
    assert set(ema_model.state_dict()) == set(keys)


# ------------------------------------------------------------------------------------------------ detection

UNSUPPORTED = {
    "SDXL": ["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", "model.diffusion_model.x"],
    "SDXL refiner": ["conditioner.embedders.0.model.text_projection"],
    "SD3": ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"],
    "FLUX": ["double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight"],
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_models_named(tmp_path, name):
    keys = UNSUPPORTED[name]
    with pytest.raises(UserError, match=f"unsupported: {name}"):
        det.detect({k: (2,) for k in keys})
    path = tmp_path / "x.safetensors"
    from minisd.io import safetensors
    safetensors.save({k: np.zeros(2, np.float32) for k in keys}, path)
    with pytest.raises(UserError, match=f"unsupported: {name}"):
        load_model(path)


def test_unsupported_diffusers_pipelines(tmp_path):
    for cls, name in (("StableDiffusionXLPipeline", "SDXL"), ("StableDiffusion3Pipeline", "SD3"),
                      ("FluxPipeline", "FLUX")):
        d = tmp_path / cls
        d.mkdir()
        (d / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        with pytest.raises(UserError, match=f"unsupported: {name}"):
            load_model(d)


@pytest.mark.parametrize("keys,msg", [
    (["lora_unet_down_blocks_0.lora_down.weight"], "LoRA"),
    (["encoder.conv_in.weight", "decoder.conv_out.weight"], "standalone VAE"),
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "one component of a diffusers folder"),
    (["weight", "bias"], "not a Stable Diffusion checkpoint"),
    (["model.diffusion_model.input_blocks.0.0.weight"], "no VAE"),
])
def test_not_a_full_sd_model(keys, msg):
    with pytest.raises(UserError, match=msg):
        det.detect({k: (4, 4, 3, 3) for k in keys})


def test_inpainting_detected_and_refused_by_the_pipeline(shared_dir):
    keys = read_keys(shared_dir / "data/sd_keys/sd1_ldm_expected_keys.txt")
    keys["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    info = det.detect(keys)
    assert info.variant == "inpainting" and "inpainting" in info.name
    model = build_model(select_weights(_fake_file(keys)), info)
    from minisd.pipeline import txt2img
    with pytest.raises(UserError, match="inpainting"):
        txt2img(model, "x", steps=1)


# ------------------------------------------------------------------------------------------------ bad files

class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _zip_with_pickle(path, payload):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("archive/byteorder", "little")
    return path


@pytest.mark.parametrize("kind", ["os.system", "eval", "unknown_global"])
def test_code_in_a_ckpt_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = {"state_dict": {"x": _Evil(os.system, f"touch {marker}")}}
    elif kind == "eval":
        payload = {"state_dict": _Evil(eval, f"open({str(marker)!r}, 'w').close()")}
    else:
        payload = {"state_dict": _Evil(shutil.rmtree, str(tmp_path / "nothing"))}  # shutil.rmtree: not allowed
    path = _zip_with_pickle(tmp_path / "evil.ckpt", payload)
    with pytest.raises(UserError, match="refusing to load") as e:
        load_model(path)
    assert str(path) in str(e.value)
    assert not marker.exists()
    if kind != "unknown_global":  # positive control: the standard unpickler does run it
        with zipfile.ZipFile(path) as z:
            try:
                pickle.loads(z.read("archive/data.pkl"))
            except Exception:
                pass
        assert marker.exists()


def test_damaged_and_foreign_files(tiny, tmp_path, shared_dir):
    torch = pytest.importorskip("torch")
    good = tiny["sd1"][2] / "model.ckpt"
    data = good.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trunc.ckpt"):
        load_model(tmp_path / "trunc.ckpt")
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "nostorage.ckpt", "w") as out:
        for n in z.namelist():
            if "/data/" not in n:
                out.writestr(n, z.read(n))
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path / "nostorage.ckpt")
    torch.save({"weight": torch.ones(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint"):  # a real .pth zip, not SD
        load_model(shared_dir / "data/weights/a1111_vae_approx/model.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "missing.ckpt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_model(tmp_path / "empty.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a checkpoint minisd can read"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not a diffusers"):
        load_model(tmp_path / "folder")
    broken = tmp_path / "broken"
    shutil.copytree(tiny["sd1"][2] / "diffusers", broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="missing vae/config.json"):
        load_model(broken)


# ------------------------------------------------------------------------------------------------ minisd format

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_convert_round_trip(tiny, tmp_path, family):
    comps, state, d = tiny[family]
    out = tmp_path / "m.safetensors"
    convert(d / "model.ckpt", out)
    m = load_model(out)
    assert_same_weights(m, state)
    ref = load_model(d / "model.ckpt")
    assert m.unet.config == ref.unet.config and m.vae.config == ref.vae.config
    assert m.text_encoder.config == ref.text_encoder.config and m.scheduler == ref.scheduler
    assert m.prediction_type == ref.prediction_type and m.default_sampler == ref.default_sampler
    assert m.scheduler_unset == ref.scheduler_unset and "timestep_spacing" in m.scheduler_unset
    with pytest.raises(UserError, match="exists"):
        convert(d / "model.ckpt", out)
    convert(d / "diffusers", out, dtype="fp16", overwrite=True)
    m16 = load_model(out)
    for k, a in load_model(d / "diffusers").state_dict().items():
        assert m16.state_dict()[k].dtype == np.float16
        np.testing.assert_array_equal(m16.state_dict()[k], a.astype(np.float16), err_msg=k)
    assert m16.default_sampler == ("pndm" if family == "sd1" else "ddim")
    with pytest.raises(UserError, match="--dtype"):
        convert(d / "model.ckpt", tmp_path / "x.safetensors", dtype="int8")


def test_legacy_vae_attention_names(tiny, tmp_path):
    """diffusers < 0.14 folders name the VAE attention query/key/value/proj_attn (still on the Hub)."""
    from safetensors.numpy import load_file, save_file
    _, state, d = tiny["sd1"]
    folder = tmp_path / "old"
    shutil.copytree(d / "diffusers", folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(str(path)).items():
        for new, old in legacy.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(path))
    assert_same_weights(load_model(folder), state)

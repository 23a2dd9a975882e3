"""`minisd verify`: agreement with diffusers on a random-weight model, and a deliberately perturbed weight named by
the block where minisd and diffusers first diverge. The reference side is diffusers itself (from_pretrained on a
folder, diffusers' single-file converters on a file), never minisd's own loader."""
import sys
from pathlib import Path

import numpy as np
import pytest

from minisd import verify as V
from minisd.cli import main
from weights_convert.load import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
fx = pytest.importorskip("make_sd_fixtures")

PERTURBED = "model.diffusion_model.input_blocks.3.0.in_layers.2.weight"  # a ResBlock conv of input_blocks.3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("verify")
    comps = fx.components("sd1")
    state = fx.to_ldm_state_dict(comps)
    fx.save_safetensors(state, d / "model.safetensors")
    fx.save_diffusers(comps, d / "diffusers")
    bad = dict(state)
    bad[PERTURBED] = state[PERTURBED] + np.float32(0.5) * state[PERTURBED].std()
    fx.save_safetensors(bad, d / "perturbed.safetensors")
    return d


def run(capsys, **kw):
    ok = V.verify(**kw)
    return ok, capsys.readouterr().out


@pytest.mark.parametrize("form", ["model.safetensors", "diffusers"])
def test_agrees_with_diffusers(tiny, capsys, form):
    ok, out = run(capsys, path=tiny / form, height=32, width=32, steps=2)
    assert ok, out
    assert "minisd and diffusers agree on every block" in out
    for comp in ("text encoder", "U-Net", "VAE decode", "VAE encode"):
        assert f"\n{comp}  (" in out
    assert "max pixel difference 0/255" in out or "max pixel difference 1/255" in out
    assert "from_pretrained" in out if form == "diffusers" else "converters" in out


def test_perturbed_weight_is_located(tiny, capsys):
    ok, out = run(capsys, path=tiny / "perturbed.safetensors", reference=tiny / "model.safetensors", height=32,
                  width=32, steps=1)
    assert not ok
    assert "U-Net first diverges at input_blocks.3" in out
    # the blocks before it agree, and so do the components that do not use the weight
    table, first = V.compare(*_sides(tiny))
    assert first == {"U-Net": "input_blocks.3"}
    unet = {name: err for name, _, err, _, _ in table["U-Net"]}
    assert unet["input_blocks.2"] < 1e-5 and unet["input_blocks.3"] > 1e-2


def _sides(tiny):
    model = load_model(tiny / "perturbed.safetensors")
    inputs = V.make_inputs(model, "a cat", 0, 32, 32, 0)
    a = V.run_minisd(model, inputs)
    b = V.run_reference(V.load_reference(tiny / "model.safetensors", model), model, inputs, a)
    return a, b


def test_cli_exit_codes(tiny, capsys):
    assert main(["verify", "--ckpt", str(tiny / "model.safetensors"), "--height", "32", "--width", "32",
                 "--steps", "0"]) == 0
    assert main(["verify", "--ckpt", str(tiny / "perturbed.safetensors"), "--reference",
                 str(tiny / "diffusers"), "--height", "32", "--width", "32", "--steps", "0"]) == 1
    out = capsys.readouterr().out
    assert "DIVERGENCE: U-Net first diverges at input_blocks.3" in out
    assert main(["verify", "--ckpt", str(tiny / "nothing.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_without_torch_runs_minisd_only(tiny, capsys, monkeypatch):
    monkeypatch.setattr(V, "have_reference", lambda: False)
    ok, out = run(capsys, path=tiny / "model.safetensors", height=32, width=32, steps=1)
    assert ok
    assert "not installed" in out and "only minisd's side ran" in out
    assert "(2, 4, 16, 16)" in out  # shapes are still reported (the U-Net output of the CFG batch)
    assert "diffusers" not in out.split("reference:")[1].split("\n", 1)[1]  # no reference timings


# ------------------------------------------------------------------------------------------------ full size (slow)

@pytest.mark.slow
def test_sd15_full_agrees_and_locates_a_perturbed_weight(capsys):
    b = fx.full_build("sd1")  # shared with test_pipeline.py's slow tests when both run in one session
    path = b["dir"] / "model.safetensors"
    ok, out = run(capsys, path=path, height=128, width=128, steps=1)
    print(out)
    assert ok, out
    model = load_model(path)
    key = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    w = model.unet.params.data[key]
    model.unet.params.data[key] = w + np.float32(0.5) * np.std(w)
    ok, out = run(capsys, path=path, model=model, height=128, width=128, steps=0)
    print(out)
    assert not ok and "U-Net first diverges at output_blocks.4" in out
    assert "text encoder  (" in out and "VAE decode  (" in out

"""The `minisd txt2img | img2img | convert | verify` commands: help texts, PNG output with metadata, atomic and
non-overwriting writes, --latents reproducing diffusers, and every user error as exit status 2 with a one-line
message and no traceback."""
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minisd import cli
from minisd.commands import txt2img as txt2img_cmd
from minisd.image import read_png_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
fx = pytest.importorskip("make_sd_fixtures")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("cli")
    comps = fx.components("sd1")
    state = fx.to_ldm_state_dict(comps)
    fx.save_safetensors(state, d / "model.safetensors")
    fx.save_ckpt(fx.with_extras(state), d / "model.ckpt")
    return comps, d


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, match):
    assert code == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and match in errors[0], err


def subprocess_cli(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "minisd.cli", *map(str, argv)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


# ------------------------------------------------------------------------------------------------ help

@pytest.mark.parametrize("command", ["txt2img", "img2img", "convert", "verify"])
def test_help_explains_every_option(command, capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, f"{command} {action.option_strings}: no help text"
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in out


# ------------------------------------------------------------------------------------------------ txt2img

def test_txt2img_writes_png_with_parameters(tiny, tmp_path, capsys):
    _, d = tiny
    out = tmp_path / "cat.png"
    code, stdout, err = run_cli(capsys, "txt2img", "--prompt", "a photo of a cat", "--negative-prompt", "blurry",
                                "--ckpt", d / "model.ckpt", "--steps", "2", "--sampler", "euler", "--karras",
                                "--seed", "7", "--height", "32", "--width", "48", "--out", out, "--quiet")
    assert code == 0, err
    assert stdout.strip() == str(out)
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (48, 32) and im.format == "PNG"
    text, meta = read_png_parameters(out)
    assert text.splitlines()[0] == "a photo of a cat"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 2, Sampler: euler karras, CFG scale: 7.5, Seed: 7, Size: 48x32" in text
    assert meta["seed"] == 7 and meta["sampler"] == "euler" and meta["karras"] is True and meta["steps"] == 2
    # the same seed gives the same image
    out2 = tmp_path / "cat2.png"
    run_cli(capsys, "txt2img", "--prompt", "a photo of a cat", "--negative-prompt", "blurry", "--ckpt",
            d / "model.ckpt", "--steps", "2", "--sampler", "euler", "--karras", "--seed", "7", "--height", "32",
            "--width", "48", "--out", out2, "--quiet")
    with Image.open(out) as a, Image.open(out2) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_num_images_grid_and_overwrite(tiny, tmp_path, capsys):
    _, d = tiny
    out = tmp_path / "x.png"
    args = ["txt2img", "--prompt", "a cat", "--ckpt", d / "model.safetensors", "--steps", "1", "--num-images", "3",
            "--height", "16", "--width", "16", "--out", out, "--quiet", "--seed", "1"]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    names = [Path(p).name for p in stdout.split()]
    assert names == ["x-0.png", "x-1.png", "x-2.png", "x-grid.png"]
    from PIL import Image
    with Image.open(tmp_path / "x-grid.png") as g:
        assert g.size == (32, 32)  # 3 images of 16x16 in a 2x2 grid
    assert read_png_parameters(tmp_path / "x-1.png")[1]["index"] == 1
    before = (tmp_path / "x-0.png").read_bytes()
    code, _, err = run_cli(capsys, *args[:-1], "2")  # another seed, no --overwrite
    assert_user_error(code, err, "exists; pass --overwrite")
    assert (tmp_path / "x-0.png").read_bytes() == before
    code, _, _ = run_cli(capsys, *args[:-1], "2", "--overwrite")
    assert code == 0 and (tmp_path / "x-0.png").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


def test_latents_file_reproduces_diffusers(tiny, tmp_path, capsys):
    import torch
    comps, d = tiny
    lat = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "lat.npy", lat.numpy())
    out = tmp_path / "l.png"
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "a cat", "--ckpt", d / "model.safetensors", "--steps", "3",
                           "--sampler", "ddim", "--latents", tmp_path / "lat.npy", "--out", out, "--quiet")
    assert code == 0, err
    ref = fx.pipeline(comps, "ddim")("a cat", latents=lat, num_inference_steps=3, height=32, width=32,
                                     output_type="np").images[0]
    from PIL import Image
    with Image.open(out) as im:
        got = np.asarray(im).astype(int)
    assert np.abs(got - np.round(ref * 255)).max() <= 1
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 16), np.float32))
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--ckpt", d / "model.safetensors", "--latents",
                           tmp_path / "bad.npy", "--out", tmp_path / "b.png")
    assert_user_error(code, err, "shape (N, 4, H/8, W/8)")
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--ckpt", d / "model.safetensors", "--latents",
                           tmp_path / "lat.npy", "--num-images", "2", "--out", tmp_path / "b.png")
    assert_user_error(code, err, "--num-images 1")


# ------------------------------------------------------------------------------------------------ img2img, convert

def test_img2img_and_convert(tiny, tmp_path, capsys):
    _, d = tiny
    from PIL import Image
    Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB").save(tmp_path / "in.png")
    out = tmp_path / "o.png"
    code, _, err = run_cli(capsys, "img2img", "--init", tmp_path / "in.png", "--strength", "0.5", "--prompt", "x",
                           "--ckpt", d / "model.ckpt", "--steps", "4", "--out", out, "--quiet", "--seed", "0")
    assert code == 0, err
    meta = read_png_parameters(out)[1]
    assert meta["strength"] == 0.5 and meta["mode"] == "img2img" and meta["init"].endswith("in.png")
    assert "Denoising strength: 0.5" in read_png_parameters(out)[0]
    code, _, err = run_cli(capsys, "img2img", "--init", tmp_path / "in.png", "--strength", "1.5", "--prompt", "x",
                           "--ckpt", d / "model.ckpt", "--out", tmp_path / "p.png")
    assert_user_error(code, err, "--strength must be in [0, 1]")
    code, _, err = run_cli(capsys, "img2img", "--init", tmp_path / "nope.png", "--prompt", "x", "--ckpt",
                           d / "model.ckpt", "--out", tmp_path / "p.png")
    assert_user_error(code, err, "image not found")
    conv = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "convert", d / "model.ckpt", conv, "--dtype", "fp16")
    assert code == 0 and "wrote" in err
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "x", "--ckpt", conv, "--steps", "1", "--out",
                           tmp_path / "c.png", "--quiet", "--height", "16", "--width", "16")
    assert code == 0, err
    code, _, err = run_cli(capsys, "convert", d / "model.ckpt", conv)
    assert_user_error(code, err, "exists; pass --overwrite")
    code, _, err = run_cli(capsys, "convert", d / "model.ckpt", tmp_path / "m2.safetensors", "--extract-ema")
    assert_user_error(code, err, "no EMA weights")


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_options_and_sizes(tiny, tmp_path, capsys):
    _, d = tiny
    base = ["txt2img", "--prompt", "x", "--ckpt", d / "model.safetensors", "--out", tmp_path / "o.png"]
    with pytest.raises(SystemExit) as e:  # argparse: usage + one error line, status 2
        cli.main([str(a) for a in base] + ["--sampler", "heun"])
    assert e.value.code == 2 and "invalid choice: 'heun'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in base] + ["--frobnicate"])
    assert e.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    code, _, err = run_cli(capsys, *base, "--height", "100")
    assert_user_error(code, err, "--height must be a positive multiple of 8")
    code, _, err = run_cli(capsys, *base, "--steps", "0")
    assert_user_error(code, err, "--steps must be at least 1")
    code, _, err = run_cli(capsys, *base, "--sampler", "ddim", "--karras")
    assert_user_error(code, err, "--karras works with")
    code, _, err = run_cli(capsys, *base[:3], "--ckpt", tmp_path / "missing.ckpt", "--out", tmp_path / "o.png")
    assert_user_error(code, err, "checkpoint not found")
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_cli(capsys, *base[:3], "--ckpt", tmp_path / "notes.txt", "--out", tmp_path / "o.png")
    assert_user_error(code, err, "not a checkpoint minisd can read")
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "o.jpg")
    assert_user_error(code, err, "--out must name a .png")
    code, _, err = run_cli(capsys, *base, "--device", "cuda")
    try:
        import cupy
        gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        gpu = False
    if not gpu:
        assert_user_error(code, err, "--device cuda needs CuPy and an NVIDIA GPU")


def test_no_default_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(txt2img_cmd, "DEFAULT_MODEL", tmp_path / "default_model.safetensors")
    code, _, err = run_cli(capsys, "txt2img", "--prompt", "a 7", "--out", tmp_path / "o.png")
    assert_user_error(code, err, "no default model is installed")
    assert "--ckpt" in err


class _Evil:
    def __init__(self, arg):
        self.arg = arg

    def __reduce__(self):
        return os.system, (self.arg,)


def test_unsafe_damaged_and_unsupported_checkpoints_via_subprocess(tiny, tmp_path):
    """Real processes: exit status 2, one error line, no traceback, and the pickle's code never ran."""
    _, d = tiny
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": _Evil(f"touch {marker}")}, protocol=2))
    data = (d / "model.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 3])
    with zipfile.ZipFile(d / "model.ckpt") as z, zipfile.ZipFile(tmp_path / "nostorage.ckpt", "w") as o:
        for n in z.namelist():
            if "/data/" not in n:
                o.writestr(n, z.read(n))
    from minisd.io import safetensors
    keys = ["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
            "model.diffusion_model.input_blocks.0.0.weight"]
    safetensors.save({k: np.zeros(2, np.float32) for k in keys}, tmp_path / "sdxl.safetensors")
    safetensors.save({"double_blocks.0.img_attn.norm.key_norm.scale": np.zeros(2, np.float32)},
                     tmp_path / "flux.safetensors")
    import torch
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "other.pt")
    cases = {evil: "refusing to load", tmp_path / "trunc.ckpt": "trunc.ckpt",
             tmp_path / "nostorage.ckpt": "missing", tmp_path / "sdxl.safetensors": "unsupported: SDXL",
             tmp_path / "flux.safetensors": "unsupported: FLUX",
             tmp_path / "other.pt": "not a Stable Diffusion checkpoint"}
    for path, match in cases.items():
        code, _, err = subprocess_cli("txt2img", "--prompt", "x", "--ckpt", path, "--out", tmp_path / "o.png",
                                      "--quiet")
        assert_user_error(code, err, match)
        assert len(err.strip().splitlines()) == 1  # --quiet: the error is the only line
    code, _, err = subprocess_cli("convert", evil, tmp_path / "e.safetensors")
    assert_user_error(code, err, "refusing to load")
    assert not marker.exists()
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "e.safetensors").exists()
    code, _, err = subprocess_cli("verify", "--ckpt", tmp_path / "sdxl.safetensors")
    assert_user_error(code, err, "unsupported: SDXL")


def test_parameters_text_format():
    from minisd.image import parameters_text
    t = parameters_text({"prompt": "a cat", "negative_prompt": "", "steps": 20, "sampler": "ddim", "guidance": 7.5,
                         "seed": 1, "width": 512, "height": 768, "model": "sd15"})
    assert t == "a cat\nSteps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 1, Size: 512x768, Model: sd15"

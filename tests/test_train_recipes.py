"""Recipes: presets validate, JSON files inherit from a base, every mistake is a UserError naming the key; and the
command-line errors for missing/corrupt data, unknown keys and the wrong kind of model file."""
import gzip
import json
import shutil

import numpy as np
import pytest

from minisd.cli import main
from minisd.errors import UserError
from minisd.train.recipes import PRESETS, load_recipe, parse_override, recipe_differences


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip_through_json(name, tmp_path):
    r = load_recipe(name)
    assert r["name"] == name and r["task"] == PRESETS[name]["task"]
    f = tmp_path / "r.json"
    f.write_text(json.dumps(r))
    assert load_recipe(str(f)) == r


def test_json_file_with_base_and_overrides(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"base": "mnist_ddpm", "steps": 777, "unet": {"model_channels": 16}}))
    r = load_recipe(str(f), ["lr=5e-4", "unet.num_heads=2"])
    assert r["name"] == "mine" and r["steps"] == 777 and r["lr"] == 5e-4
    assert r["unet"]["model_channels"] == 16 and r["unet"]["num_heads"] == 2
    assert r["unet"]["num_classes"] == 11  # untouched nested fields come from the base
    assert recipe_differences(load_recipe("mnist_ddpm"), r)[0][0] == "lr"


@pytest.mark.parametrize("content,match", [
    ({"base": "mnist_ddpm", "lr_warmup": 10}, r"unknown recipe key 'lr_warmup'.*Keys of a pixel_ddpm recipe"),
    ({"base": "mnist_ddpm", "warmup": 10}, r"did you mean 'warmup_steps'"),
    ({"base": "mnist_ddpm", "steps": "many"}, r"'steps' must be an integer, got \"many\""),
    ({"base": "mnist_ddpm", "unet": {"model_chanels": 8}}, r"unknown field 'model_chanels'.*did you mean "
                                                          r"'model_channels'"),
    ({"base": "mnist_ddpm", "unet": {"model_channels": 12}}, r"invalid UNetConfig.*not divisible"),
    ({"base": "nope"}, r"\"base\": 'nope' is not a preset"),
    ({"task": "gan"}, r"\"task\" must be one of"),
    ({"base": "mnist_ddpm", "warmup_steps": 5000}, r"warmup_steps"),
    ({"base": "mnist_ddpm", "dataset": "imagenet"}, r"\"dataset\" must be one of"),
])
def test_bad_recipe_files(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    with pytest.raises(UserError, match=match):
        load_recipe(str(f))


def test_unreadable_recipes(tmp_path):
    with pytest.raises(UserError, match="did you mean 'mnist_ddpm'"):
        load_recipe("mnist_ddmp")
    f = tmp_path / "broken.json"
    f.write_text('{"base": "mnist_ddpm",')
    with pytest.raises(UserError, match="not valid JSON"):
        load_recipe(str(f))
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="expected key=value"):
        parse_override("steps")


def test_cli_lists_prints_and_rejects(tmp_path, capsys):
    assert main(["train", "--list"]) == 0
    assert "mnist_ldm" in capsys.readouterr().out
    assert main(["train", "--print-recipe", "mnist_vae"]) == 0
    assert json.loads(capsys.readouterr().out) == load_recipe("mnist_vae")
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"base": "mnist_vae", "klweight": 1}))
    assert main(["train", "--recipe", str(f), "--out", str(tmp_path / "run")]) == 2
    assert "unknown recipe key 'klweight' (did you mean 'kl_weight'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing is created before the recipe is valid


def test_missing_data_directory_says_how_to_get_it(tmp_path, capsys):
    code = main(["train", "--recipe", "mnist_classifier", "--data-dir", str(tmp_path / "nodata"), "--no-progress",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "minisd download mnist" in err and "train-images-idx3-ubyte" in err


def test_corrupt_data_file_is_named(shared_dir, tmp_path, capsys):
    src = shared_dir / "data" / "mnist"
    dst = tmp_path / "data" / "mnist"
    dst.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(src / name, dst / name)
    labels = bytearray(gzip.decompress((src / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # one wrong label: the header is valid, only the checksum can tell
    (dst / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    code = main(["train", "--recipe", "mnist_classifier", "--data-dir", str(tmp_path / "data"), "--no-progress",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "train-labels-idx1-ubyte" in err and "sha256" in err.lower()


def test_sample_and_eval_refuse_the_wrong_kind_of_file(tmp_path, capsys):
    from minisd.train.checkpoints import write_model_file
    from minisd.train.classifier import ConvNet, ConvNetConfig
    net = ConvNet(ConvNetConfig(widths=(8,), norm_groups=4))
    f = write_model_file(tmp_path / "clf.safetensors", net.params.state_dict(),
                         {"kind": "classifier", "config": {"widths": [8], "norm_groups": 4}})
    assert main(["sample", "--ckpt", str(f), "--out", str(tmp_path / "x.png")]) == 2
    assert "is a classifier model" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "nothing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["eval", "--ckpt", str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    np.testing.assert_equal(len(net.params.keys()) > 0, True)

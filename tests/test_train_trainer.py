"""The trainer as a long-running job: exact resume after Ctrl-C, SIGKILL in the middle of a checkpoint write, stop on
NaN keeping the last good checkpoint, keep-last-K, and the clear errors for a wrong run folder or recipe.

Tiny models on 64 random images (the real loaders are tested in test_datasets.py); the recipe uses every source of
randomness a step has (shift augmentation, label dropout, timesteps, noise, ResBlock dropout) so an exact resume
is a real test of the saved generator states."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from minisd.datasets import Split
from minisd.errors import UserError
from minisd.io import safetensors
from minisd.train import checkpoints as ck
from minisd.train import data as train_data
from minisd.train.recipes import load_recipe
from minisd.train.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parent.parent
SETS = ["unet.model_channels=8", "unet.norm_num_groups=4", "unet.dropout=0.1", "augment=shift", "batch_size=8",
        "steps=12", "warmup_steps=3", "ckpt_every=5", "log_every=1", "sample_every=1000", "keep_last=3",
        "label_dropout=0.3", "sample_steps=2", "grid_columns=2"]


def _tiny_split():
    g = np.random.default_rng(5)
    return Split(g.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), np.arange(64, dtype=np.int64) % 10)


@pytest.fixture
def tiny_mnist(monkeypatch):
    split = _tiny_split()
    monkeypatch.setattr(train_data, "load_dataset", lambda name, s, data_dir=None: split)
    return split


def _recipe(extra=()):
    return load_recipe("mnist_ddpm", SETS + list(extra))


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines())
            if "loss" in r}


def _weights(run):
    return safetensors.load(Path(run) / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted 12-step run every resume test must reproduce."""
    mp = pytest.MonkeyPatch()
    split = _tiny_split()
    mp.setattr(train_data, "load_dataset", lambda name, s, data_dir=None: split)
    out = tmp_path_factory.mktemp("reference")
    Trainer(_recipe(), out, progress=False, log=lambda m: None).run()
    mp.undo()
    return out


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(tiny_mnist, reference_run, tmp_path):
    t = Trainer(_recipe(), tmp_path, progress=False, log=lambda m: None)
    real, calls = t.task.step, []

    def step(idx, rng):
        calls.append(1)
        out = real(idx, rng)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the trainer finishes the step, then stops
        return out

    t.task.step = step
    summary = t.run()
    assert summary["status"] == "interrupted" and summary["step"] == 7
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5, 7]
    assert max(_losses(tmp_path)) == 7
    Trainer(_recipe(), tmp_path, resume=True, progress=False, log=lambda m: None).run()
    ref, got = _losses(reference_run), _losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    assert got == ref  # bit for bit: same batches, noise, dropout masks, optimizer and EMA state
    a, b = _weights(reference_run), _weights(tmp_path)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(reference_run, tmp_path):
    """A child process trains and is SIGKILLed while its step-10 checkpoint is being written (temp file complete,
    not yet renamed). The step-5 checkpoint must load, and --resume must reproduce the uninterrupted losses."""
    marker = tmp_path / "writing"
    run = tmp_path / "run"
    child = textwrap.dedent(f"""
        import os, sys, time
        import numpy as np
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_train_trainer import _recipe, _tiny_split
        from minisd.train import data as train_data
        from minisd.train.trainer import Trainer
        split = _tiny_split()
        train_data.load_dataset = lambda name, s, data_dir=None: split
        real_fsync, seen = os.fsync, []
        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{{fd}}")
            if os.path.basename(path).startswith(".ckpt-") and path.endswith(".tmp"):
                seen.append(path)
                if len(seen) == 2:  # the second checkpoint (step 10): its bytes are written, the rename is not
                    open({str(marker)!r}, "w").close()
                    time.sleep(120)
            real_fsync(fd)
        os.fsync = fsync
        Trainer(_recipe(), {str(run)!r}, progress=False, log=lambda m: None).run()
    """)
    p = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
    t0 = time.time()
    while not marker.exists():
        assert p.poll() is None, "the child exited before reaching the checkpoint write"
        assert time.time() - t0 < 300, "timed out waiting for the checkpoint write"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    names = sorted(q.name for q in ck.checkpoint_dir(run).iterdir())
    assert [s for s, _ in ck.list_checkpoints(run)] == [5]  # the half-done step-10 file is not a checkpoint
    assert any(n.startswith(".ckpt-00000010") and n.endswith(".tmp") for n in names)
    meta, tensors = ck.read_checkpoint(ck.checkpoint_dir(run) / "ckpt-00000005.safetensors")
    assert meta["step"] == 5 and all(np.isfinite(v).all() for k, v in tensors.items() if k.startswith("model/"))

    mp = pytest.MonkeyPatch()
    split = _tiny_split()
    mp.setattr(train_data, "load_dataset", lambda name, s, data_dir=None: split)
    msgs = []
    try:
        Trainer(_recipe(), run, resume=True, progress=False, log=msgs.append).run()
    finally:
        mp.undo()
    assert any("interrupted" in m for m in msgs)  # the temp file was reported and removed
    assert not [q for q in ck.checkpoint_dir(run).iterdir() if q.name.endswith(".tmp")]
    assert _losses(run) == _losses(reference_run)  # steps 6-9 were logged twice; the first copies were dropped


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path):
    t = Trainer(_recipe(["ckpt_every=2"]), tmp_path, progress=False, log=lambda m: None)
    real, calls = t.task.step, []

    def step(idx, rng):
        calls.append(1)
        loss, extra = real(idx, rng)
        return (float("nan") if len(calls) == 4 else loss), extra

    t.task.step = step
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 4.*ckpt-00000002") as e:
        t.run()
    assert "Lower lr" in str(e.value)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2]
    meta, tensors = ck.read_checkpoint(ck.list_checkpoints(tmp_path)[-1][1])
    assert all(np.isfinite(v).all() for v in tensors.values() if v.dtype.kind == "f")
    events = [json.loads(s).get("event") for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "diverged" in events


def test_infinite_gradient_stops_before_the_update(tiny_mnist, tmp_path):
    t = Trainer(_recipe(["ckpt_every=2"]), tmp_path, progress=False, log=lambda m: None)
    real = t.task.step
    before = {}

    def step(idx, rng):
        out = real(idx, rng)
        if t.step == 2:  # the third step: poison one gradient
            before.update({k: v.copy() for k, v in t.params[0].data.items()})
            next(iter(t.params[0].grads.values()))[...] = np.inf
        return out

    t.task.step = step
    with pytest.raises(TrainingDiverged, match="the gradient norm became"):
        t.run()
    assert all(np.array_equal(before[k], v) for k, v in t.params[0].data.items())  # no half-applied step


def test_keep_last_k(tiny_mnist, tmp_path):
    Trainer(_recipe(["ckpt_every=2", "keep_last=2"]), tmp_path, progress=False, log=lambda m: None).run()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [10, 12]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "loss.png").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 12


def test_run_folder_and_recipe_mismatch_errors(tiny_mnist, tmp_path):
    quiet = dict(progress=False, log=lambda m: None)
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(_recipe(), tmp_path, resume=True, **quiet)
    Trainer(_recipe(["steps=2", "warmup_steps=1"]), tmp_path, **quiet).run()
    with pytest.raises(UserError, match="already holds checkpoints"):
        Trainer(_recipe(), tmp_path, **quiet)
    with pytest.raises(UserError, match=r"different recipe.*lr: checkpoint 0.002, now 0.0005"):
        Trainer(_recipe(["steps=2", "warmup_steps=1", "lr=5e-4"]), tmp_path, resume=True, **quiet)
    other = load_recipe("mnist_classifier", ["model.widths=[8,16]", "steps=2", "warmup_steps=1"])
    with pytest.raises(UserError, match="is a pixel_ddpm checkpoint"):
        Trainer(other, tmp_path, resume=True, **quiet)
    # allowed: more steps (the schedule stretches), or any change with allow_changes
    msgs = []
    Trainer(_recipe(["steps=3", "warmup_steps=1"]), tmp_path, resume=True, progress=False, log=msgs.append).run()
    assert any("steps changed" in m for m in msgs)
    t = Trainer(_recipe(["steps=3", "warmup_steps=1", "lr=5e-4"]), tmp_path, resume=True, progress=False,
                log=msgs.append, allow_changes=True)
    assert t.step == 3 and any("changed recipe" in m for m in msgs)


def test_checkpoint_contents(tiny_mnist, tmp_path):
    Trainer(_recipe(["steps=2", "warmup_steps=1", "ckpt_every=2"]), tmp_path, progress=False,
            log=lambda m: None).run()
    meta, tensors = ck.read_checkpoint(ck.list_checkpoints(tmp_path)[-1][1])
    assert meta["format"] == "minisd-train-checkpoint" and meta["step"] == 2
    assert meta["recipe"] == _recipe(["steps=2", "warmup_steps=1", "ckpt_every=2"])
    kinds = {k.split("/")[0] for k in tensors}
    assert kinds == {"model", "optim", "ema"}
    assert all(v.dtype == np.float32 for k, v in tensors.items() if k.startswith(("model/", "ema/shadow.")))
    with pytest.raises(UserError, match="exported model"):
        ck.read_checkpoint(tmp_path / "model.safetensors")

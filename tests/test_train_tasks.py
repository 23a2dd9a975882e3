"""The training step of every task, end to end through its loss: float64 central differences of the whole step's
loss (the same random draws each time) against the gradients the step leaves in params.grads. The models' own
backward passes are tested in test_model_*.py; this checks the glue (loss scaling, reparameterisation, KL weight,
the contrastive loss through the text pooling, label/caption dropout)."""
import copy

import numpy as np
import pytest

from minisd.datasets import Split
from minisd.testing import rel_error
from minisd.train import data as train_data
from minisd.train.recipes import load_recipe
from minisd.train.task import make_task


@pytest.fixture
def tiny_mnist(monkeypatch):
    """64 random 'digits' (uint8, 1x28x28) with labels 0-9 instead of the real files (the loaders are tested in
    test_datasets.py)."""
    g = np.random.default_rng(5)
    split = Split(g.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), np.arange(64, dtype=np.int64) % 10)
    monkeypatch.setattr(train_data, "load_dataset", lambda name, split_name, data_dir=None: split)
    return split


def _to_float64(task, monkeypatch):
    """Switch every model of the task and its batches to float64 (central differences need it)."""
    for P in task.trainable():
        P.astype(np.float64)
        P.compute_dtype = np.dtype(np.float64)
    batch = task.data.batch
    monkeypatch.setattr(task.data, "batch", lambda idx, rng=None, augment=True: (
        lambda xy: (xy[0].astype(np.float64), xy[1]))(batch(idx, rng, augment)))


def _check_step_gradients(task, idx, n_checks=3, seed=7, every=1):
    """Worst error over n_checks random entries of every `every`-th parameter tensor (and always the first and
    last tensor: the input and output layers)."""
    def loss():
        for P in task.trainable():
            P.zero_grad()
        return task.step(idx, np.random.default_rng(seed))[0]  # identical draws every call

    loss()
    grads = {k: g.copy() for P in task.trainable() for k, g in P.grads.items()}
    g = np.random.default_rng(0)
    worst = 0.0
    top = max(np.abs(v).max() for v in grads.values())
    for P in task.trainable():
        names = list(P.keys())
        for name in names[::every] + names[-1:]:
            p = P.data[name]
            # errors relative to the tensor's largest gradient, but at least 1e-3 of the model's: some gradients
            # are exactly zero in theory (attention key biases shift every score of a row equally) and their
            # central differences are pure rounding noise
            scale = max(np.abs(grads[name]).max(), 1e-3 * top)
            for _ in range(n_checks):
                i = tuple(int(g.integers(0, s)) for s in p.shape)
                old = p[i]
                p[i] = old + 1e-6
                lp = loss()
                p[i] = old - 1e-6
                lm = loss()
                p[i] = old
                num = (lp - lm) / 2e-6
                worst = max(worst, abs(num - grads[name][i]) / scale)
    return worst


def test_vae_step_gradients_float64(tiny_mnist, monkeypatch):
    r = load_recipe("mnist_vae", ["vae.ch=4", "vae.norm_num_groups=2", "kl_weight=0.01", "batch_size=3"])
    task = make_task(r)
    _to_float64(task, monkeypatch)
    assert _check_step_gradients(task, np.array([0, 5, 9]), n_checks=1, every=4) < 1e-6


def test_pixel_ddpm_step_gradients_float64(tiny_mnist, monkeypatch):
    r = load_recipe("mnist_ddpm", ["unet.model_channels=4", "unet.norm_num_groups=2", "unet.channel_mult=[1,2]",
                                   "unet.attention_resolutions=[2]", "unet.num_heads=2", "label_dropout=0.5"])
    task = make_task(r)
    _to_float64(task, monkeypatch)
    assert _check_step_gradients(task, np.array([1, 2, 3, 4]), n_checks=1, every=8) < 1e-6


def test_clip_step_gradients_float64(tiny_mnist, monkeypatch):
    r = load_recipe("mnist_clip", ["text.hidden_size=8", "text.intermediate_size=16", "text.num_attention_heads=2",
                                   "text.projection_dim=6", "image.out_dim=6", "image.widths=[4,8]",
                                   "image.norm_groups=2"])
    task = make_task(r)
    _to_float64(task, monkeypatch)
    # the token embedding table has 49408 rows, most never used: check rows the captions use, and everything else
    emb = task.clip.text.params.data[task.clip.text.prefix + "text_model.embeddings.token_embedding.weight"]
    assert emb.shape[0] == 49408
    assert _check_step_gradients(task, np.array([0, 1, 2, 3, 13]), n_checks=2) < 1e-6


def test_steps_stay_float32(tiny_mnist):
    """No silent float64 anywhere in a float32 step: gradients, losses, and the batches."""
    for name, sets in [("mnist_ddpm", ["unet.model_channels=8", "unet.norm_num_groups=4"]),
                       ("mnist_vae", ["vae.ch=8", "vae.norm_num_groups=4"]),
                       ("mnist_clip", ["image.widths=[8,16]", "text.hidden_size=8", "text.intermediate_size=16",
                                       "text.num_attention_heads=2", "text.projection_dim=8", "image.out_dim=8"]),
                       ("mnist_classifier", ["model.widths=[8,16]"])]:
        task = make_task(load_recipe(name, sets + ["batch_size=4"]))
        loss, extra = task.step(np.arange(4), np.random.default_rng(0))
        assert np.isfinite(loss) and isinstance(loss, float)
        dtypes = {g.dtype for P in task.trainable() for g in P.grads.values()}
        dtypes |= {v.dtype for P in task.trainable() for v in P.data.values()}
        assert dtypes == {np.dtype(np.float32)}, (name, dtypes)
        assert set(task.trainable()[0].grads) == set(task.trainable()[0].keys())  # every parameter is trained


def test_label_dropout_uses_the_null_class(tiny_mnist, monkeypatch):
    r = load_recipe("mnist_ddpm", ["unet.model_channels=8", "unet.norm_num_groups=4", "label_dropout=0.5"])
    task = make_task(r)
    seen = []
    real = task.unet.forward
    monkeypatch.setattr(task.unet, "forward", lambda *a, **k: (seen.append(k["y"].copy()), real(*a, **k))[1])
    task.step(np.arange(64), np.random.default_rng(0))
    y = seen[0]
    assert set(np.unique(y)) <= set(range(11)) and (y == 10).sum() > 10 and (y < 10).sum() > 10
    assert np.all((y == 10) | (y == tiny_mnist.labels))


def test_recipe_config_mismatch_is_a_clear_error(tiny_mnist):
    from minisd.errors import UserError
    r = copy.deepcopy(load_recipe("mnist_ddpm"))
    r["unet"]["num_classes"] = 10  # forgot the null class
    with pytest.raises(UserError, match="num_classes = 11"):
        make_task(r)
    r = load_recipe("mnist_vae", ["pad=0"])  # 28 is not divisible by the VAE's 4x downsampling... it is; 30 is not
    r = load_recipe("mnist_vae", ["pad=1"])
    with pytest.raises(UserError, match="not divisible"):
        make_task(r)

"""Evaluation metrics (Frechet distance against scipy's matrix square root, accuracy, CLIP score) and the PNG
helpers (grids and the loss curve drawn with Pillow)."""
import numpy as np
import pytest
from PIL import Image

from minisd.train.data import eval_images, prepare
from minisd.train.metrics import classifier_report, feature_frechet, frechet_distance, gaussian_stats
from minisd.train.plots import image_grid, loss_curve


def _scipy_fd(a, b):
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real  # the classic FID implementation (pytorch-fid's calculate_frechet_distance)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("F", [3, 16])
def test_frechet_distance_matches_scipy_sqrtm(rng, F):
    a = rng.standard_normal((400, F)) @ rng.standard_normal((F, F))
    b = 0.5 + rng.standard_normal((300, F)) @ rng.standard_normal((F, F))
    ref = _scipy_fd(a, b)
    got = feature_frechet(a, b)
    assert abs(got - ref) < 1e-8 * max(1.0, abs(ref))


def test_frechet_distance_properties(rng):
    a = rng.standard_normal((200, 5))
    mu, s = gaussian_stats(a)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9  # identical Gaussians
    # Gaussians with equal covariance: only the means count
    assert abs(frechet_distance(mu, s, mu + 2.0, s) - 5 * 4.0) < 1e-9
    b = rng.standard_normal((300, 5)) * 2
    assert abs(feature_frechet(a, b) - feature_frechet(b, a)) < 1e-9
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(mu, s, mu[:3], s[:3, :3])


def test_classifier_report_counts_per_class():
    class Fixed:  # a "classifier" that predicts class = first pixel value, feature = two pixels
        def predict(self, x):
            k = x[:, 0, 0, 0].astype(int)
            return np.eye(3)[k], x[:, 0, 0, :2].astype(np.float64)
    x = np.zeros((6, 1, 1, 2))
    x[:, 0, 0, 0] = [0, 0, 1, 2, 2, 1]
    x[:, 0, 0, 1] = np.arange(6)
    rep = classifier_report(Fixed(), x, np.array([0, 0, 1, 1, 2, 2]), np.random.default_rng(0).normal(size=(50, 2)), 3)
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["accuracy_per_class"] == {0: 1.0, 1: 0.5, 2: 0.5}
    assert rep["samples"] == 6 and rep["frechet_distance"] > 0


def test_eval_images_undoes_padding_and_rgb():
    u8 = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    x = prepare(u8, pad=2, rgb=True)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    assert np.all(x[:, :, :2] == -1) and np.all(x[:, :, :, -2:] == -1)
    # the mean of three equal float32 values is that value up to one rounding
    np.testing.assert_allclose(eval_images(x, (1, 28, 28)), prepare(u8), rtol=0, atol=1.2e-7)
    with pytest.raises(ValueError, match="do not crop"):
        eval_images(x, (1, 27, 27))


def test_image_grid_and_loss_curve(tmp_path):
    x = np.linspace(-1, 1, 5 * 1 * 7 * 9).reshape(5, 1, 7, 9)
    g = image_grid(x, 3, row_labels=["a", "b"])
    assert g.dtype == np.uint8 and g.ndim == 3 and g.shape[2] == 3
    # 7x9 images are upscaled by ceil(56 / 9) = 7: 2 rows of 49 pixels, 3 gaps of 2
    assert g.shape[0] == 2 * (7 * 7 + 2) + 2
    steps = np.arange(1, 301)
    p = loss_curve(steps, 1.0 / steps + 0.01, tmp_path / "loss.png", title="t")
    im = Image.open(p)
    assert im.size == (800, 450) and im.format == "PNG"
    assert len(np.unique(np.asarray(im.convert("L")))) > 3  # something was drawn

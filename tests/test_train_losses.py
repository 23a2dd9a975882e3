"""Training losses and the models only the trainer uses: ConvNet (classifier / CLIP image tower), cross-entropy, the
CLIP contrastive loss, and the full training steps of every task (float64 finite differences through the whole
loss, PyTorch parity in float32)."""
import numpy as np
import pytest

from minisd.testing import numerical_gradient, rel_error
from minisd.train.classifier import ConvNet, ConvNetConfig, cross_entropy
from minisd.train.clip import LOGIT_SCALE_MAX, clip_loss

TINY_NET = ConvNetConfig(in_channels=2, widths=(4, 8), blocks_per_stage=1, norm_groups=2, out_dim=3)


# ------------------------------------------------------------------------------------------------ cross-entropy

def test_cross_entropy_matches_torch(rng):
    torch = pytest.importorskip("torch")
    logits = (3 * rng.standard_normal((7, 5))).astype(np.float32)
    labels = rng.integers(0, 5, 7)
    loss, d = cross_entropy(logits, labels)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    assert abs(loss - ref.item()) < 1e-6 * abs(ref.item())
    assert d.dtype == np.float32
    assert rel_error(d, t.grad.numpy()) < 1e-5


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    loss, d = cross_entropy(logits, np.array([1]))
    assert np.isfinite(loss) and abs(loss - 1e4) < 1 and np.isfinite(d).all()


# ------------------------------------------------------------------------------------------------ ConvNet

def _torch_convnet(net, x):
    """The same architecture written with torch.nn.functional from the docstring, reading minisd's weights."""
    import torch
    import torch.nn.functional as F
    cfg, p = net.config, net.prefix
    W = {k[len(p):]: torch.tensor(v, requires_grad=True) for k, v in net.params.data.items()}
    h = F.conv2d(x, W["stem.weight"], W["stem.bias"], padding=1)
    for i in range(len(cfg.widths)):
        if i > 0:
            a = F.silu(F.group_norm(h, cfg.norm_groups, W[f"stages.{i}.down_norm.weight"],
                                    W[f"stages.{i}.down_norm.bias"], eps=1e-5))
            h = F.conv2d(a, W[f"stages.{i}.down.weight"], W[f"stages.{i}.down.bias"], stride=2, padding=1)
        for j in range(cfg.blocks_per_stage):
            b = f"stages.{i}.blocks.{j}."
            a = F.silu(F.group_norm(h, cfg.norm_groups, W[b + "norm.weight"], W[b + "norm.bias"], eps=1e-5))
            h = h + F.conv2d(a, W[b + "conv.weight"], W[b + "conv.bias"], padding=1)
    a = F.silu(F.group_norm(h, cfg.norm_groups, W["out_norm.weight"], W["out_norm.bias"], eps=1e-5))
    feat = a.mean(dim=(2, 3))
    out = F.linear(feat, W["head.weight"], W.get("head.bias"))
    return out, feat, W


@pytest.mark.parametrize("N,H,W", [(1, 7, 9), (3, 8, 8)])
def test_convnet_matches_torch_float32(rng, N, H, W):
    torch = pytest.importorskip("torch")
    net = ConvNet(TINY_NET, rng=rng)
    for k in net.params.keys():  # no special values (ones/zeros) that could hide a wrong connection
        net.params.data[k] = (net.params.data[k] + 0.1 * rng.standard_normal(net.params.data[k].shape)).astype(
            np.float32)
    x = rng.standard_normal((N, 2, H, W)).astype(np.float32)
    out, feat, cache = net.forward(x, keep_cache=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dfeat = rng.standard_normal(feat.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    t_out, t_feat, tW = _torch_convnet(net, tx)
    (t_out * torch.tensor(dout)).sum().add((t_feat * torch.tensor(dfeat)).sum()).backward()
    dx = net.backward(dout, cache, dfeat=dfeat)
    assert rel_error(out, t_out.detach().numpy()) < 1e-5
    assert rel_error(feat, t_feat.detach().numpy()) < 1e-5
    assert rel_error(dx, tx.grad.numpy()) < 1e-5
    errs = {k: rel_error(net.params.grads[net.prefix + k], v.grad.numpy()) for k, v in tW.items()}
    # A conv bias gradient is sum(dy) over N*H*W = 192 terms that largely cancel, and torch sums them in another
    # order: measured 1.0e-5 relative to the small total (every other gradient < 1e-6). The float64 test below
    # checks the same gradients to 1e-10.
    assert max(errs.values()) < 3e-5


def test_convnet_matches_torch_float64(rng):
    torch = pytest.importorskip("torch")
    net = ConvNet(TINY_NET, rng=rng, dtype=np.float64)
    for k in net.params.keys():
        net.params.data[k] = net.params.data[k] + 0.1 * rng.standard_normal(net.params.data[k].shape)
    x = rng.standard_normal((3, 2, 8, 8))
    out, _, cache = net.forward(x, keep_cache=True)
    dout = rng.standard_normal(out.shape)
    tx = torch.tensor(x, requires_grad=True)
    t_out, _, tW = _torch_convnet(net, tx)
    (t_out * torch.tensor(dout)).sum().backward()
    dx = net.backward(dout, cache)
    assert rel_error(out, t_out.detach().numpy()) < 1e-10
    assert rel_error(dx, tx.grad.numpy()) < 1e-10
    assert max(rel_error(net.params.grads[net.prefix + k], v.grad.numpy()) for k, v in tW.items()) < 1e-10


def test_convnet_gradcheck_float64(rng):
    net = ConvNet(TINY_NET, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 2, 6, 5))
    out, _, cache = net.forward(x, keep_cache=True)
    dout = rng.standard_normal(out.shape)
    dx = net.backward(dout, cache)
    assert rel_error(dx, numerical_gradient(lambda: net.forward(x)[0], x, dout)) < 1e-6
    for name in ("classifier.stem.weight", "classifier.stages.1.down.weight", "classifier.out_norm.bias",
                 "classifier.head.weight"):
        p = net.params.data[name]
        assert rel_error(net.params.grads[name], numerical_gradient(lambda: net.forward(x)[0], p, dout)) < 1e-6


def test_convnet_bad_input(rng):
    net = ConvNet(TINY_NET, rng=rng)
    with pytest.raises(ValueError, match=r"ConvNet: x must be \(N, 2, H, W\)"):
        net.forward(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        ConvNetConfig(widths=(6, 8), norm_groups=4)


# ------------------------------------------------------------------------------------------------ CLIP loss

def _torch_clip_loss(img, txt, t):
    import torch
    import torch.nn.functional as F
    a, b = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = t.clamp(max=LOGIT_SCALE_MAX).exp() * a @ b.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("log_scale", [np.log(1 / 0.07), 5.0])  # 5.0 > log(100): the clamp is active
def test_clip_loss_matches_torch(rng, log_scale):
    torch = pytest.importorskip("torch")
    img = rng.standard_normal((6, 5)).astype(np.float32)
    txt = rng.standard_normal((6, 5)).astype(np.float32)
    ls = np.array([log_scale], np.float32)
    loss, dimg, dtxt, dlog, acc = clip_loss(img, txt, ls)
    ti, tt, tl = (torch.tensor(a, requires_grad=True) for a in (img, txt, ls))
    ref = _torch_clip_loss(ti, tt, tl[0])
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5 * abs(ref.item())
    assert rel_error(dimg, ti.grad.numpy()) < 1e-5
    assert rel_error(dtxt, tt.grad.numpy()) < 1e-5
    assert dlog.shape == (1,) and dlog.dtype == np.float32
    if log_scale > LOGIT_SCALE_MAX:
        assert dlog[0] == 0.0 and tl.grad.item() == 0.0
    else:
        assert abs(dlog[0] - tl.grad.item()) < 1e-5 * max(1.0, abs(tl.grad.item()))


def test_clip_loss_gradcheck_float64(rng):
    img, txt = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    ls = np.array([1.3])
    _, dimg, dtxt, dlog, _ = clip_loss(img, txt, ls)
    f = lambda: np.array(clip_loss(img, txt, ls)[0])  # noqa: E731
    one = np.array(1.0)
    assert rel_error(dimg, numerical_gradient(f, img, one)) < 1e-6
    assert rel_error(dtxt, numerical_gradient(f, txt, one)) < 1e-6
    assert rel_error(dlog, numerical_gradient(f, ls, one)) < 1e-6

"""A small pre-activation ConvNet with hand-written backward: the evaluation classifier and the tiny CLIP's image tower.

Why a classifier of our own: FID needs Inception-v3 weights, which minisd cannot download or ship. Instead a ConvNet
trained with minisd on the real training set classifies generated samples (is a requested "7" a 7?) and its pooled
features stand in for Inception's in a Frechet distance (metrics.py). Numbers from it compare minisd runs with each
other; they are not FID and not comparable with published FIDs.

Architecture (ConvNetConfig; widths (32, 64, 128) for MNIST):
    stem      conv 3x3, in -> w0                                   (N, w0, H, W)
    stage i   [i > 0] GN+SiLU -> conv 3x3 stride 2, w_{i-1} -> w_i (N, w_i, H/2^i, W/2^i)
              blocks_per_stage x  h = h + conv 3x3(GN+SiLU(h))     residual, pre-activation (He et al. 2016)
    out       GN+SiLU -> global average pool = features (N, w_last) -> head linear -> (N, out_dim)
Parameter names: <prefix>stem.weight, <prefix>stages.1.down.weight, <prefix>stages.1.blocks.0.conv.weight, ...

References:
  He et al. 2016, "Identity Mappings in Deep Residual Networks" (pre-activation blocks),
    https://arxiv.org/abs/1603.05027
  Wu & He 2018, "Group Normalization", https://arxiv.org/abs/1803.08494
Glossary: N=batch, C=channels, H,W=spatial, K=classes.
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..models.common import conv, conv_backward, group_norm, group_norm_backward_named, linear, linear_backward_named
from ..nn import Params, init_params
from .task import Task, register

GN_EPS = 1e-5


@dataclass(frozen=True)
class ConvNetConfig:
    in_channels: int = 1  # e.g. 1 (MNIST), 3 (CIFAR-10)
    widths: tuple = (32, 64, 128)  # channels of each stage; every stage after the first halves H and W
    blocks_per_stage: int = 1  # residual 3x3 convs per stage, e.g. 1
    norm_groups: int = 8  # GroupNorm groups, e.g. 8
    out_dim: int = 10  # classes (classifier) or the embedding width (CLIP image tower), e.g. 10
    head_bias: bool = True  # CLIP's projection has no bias

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths or any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"ConvNetConfig: every width must be divisible by norm_groups={self.norm_groups}, "
                             f"got widths {self.widths}")

    @property
    def feature_dim(self):
        return self.widths[-1]


def param_shapes(cfg, prefix):
    w = cfg.widths
    s = {"stem.weight": (w[0], cfg.in_channels, 3, 3), "stem.bias": (w[0],)}
    for i, c in enumerate(w):
        if i > 0:
            s.update({f"stages.{i}.down_norm.weight": (w[i - 1],), f"stages.{i}.down_norm.bias": (w[i - 1],),
                      f"stages.{i}.down.weight": (c, w[i - 1], 3, 3), f"stages.{i}.down.bias": (c,)})
        for j in range(cfg.blocks_per_stage):
            b = f"stages.{i}.blocks.{j}."
            s.update({b + "norm.weight": (c,), b + "norm.bias": (c,), b + "conv.weight": (c, c, 3, 3),
                      b + "conv.bias": (c,)})
    s.update({"out_norm.weight": (w[-1],), "out_norm.bias": (w[-1],), "head.weight": (cfg.out_dim, w[-1])})
    if cfg.head_bias:
        s["head.bias"] = (cfg.out_dim,)
    return {prefix + k: v for k, v in s.items()}


class ConvNetCache(NamedTuple):
    layers: list  # caches in forward order
    pooled_shape: tuple  # (N, C, h, w) of the map that was averaged


class ConvNet:
    """forward(x) -> (out (N, out_dim), features (N, feature_dim), cache); backward(dout, dfeat, cache) -> dx."""

    def __init__(self, config, prefix="classifier.", params=None, rng=None, dtype=np.float32):
        self.config, self.prefix = config, prefix
        shapes = param_shapes(config, prefix)
        if params is None:
            rng = np.random.default_rng(0) if rng is None else rng
            params = Params(init_params(shapes, rng, dtype), compute_dtype=dtype)
        elif params.shapes() != shapes:
            Params({k: np.empty(0) for k in shapes}).load_state_dict(
                {k: np.empty(v) for k, v in params.shapes().items()})  # raises with the missing/unexpected listing
        self.params = params

    def forward(self, x, keep_cache=False):
        """x (N, in_channels, H, W) in [-1, 1] -> (out (N, out_dim), features (N, feature_dim), cache or None)."""
        cfg, P, p, G = self.config, self.params, self.prefix, self.config.norm_groups
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"ConvNet: x must be (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        keep = []
        h, c = conv(P, p + "stem", x)
        keep.append(c)
        for i in range(len(cfg.widths)):
            if i > 0:
                a, c1 = group_norm(P, f"{p}stages.{i}.down_norm", h, G, GN_EPS, act="silu")
                h, c2 = conv(P, f"{p}stages.{i}.down", a, stride=2, padding=1)
                keep.append((c1, c2))
            for j in range(cfg.blocks_per_stage):
                b = f"{p}stages.{i}.blocks.{j}."
                a, c1 = group_norm(P, b + "norm", h, G, GN_EPS, act="silu")
                r, c2 = conv(P, b + "conv", a)
                h = h + r  # residual: the block learns a correction, so deep stacks start as the identity
                keep.append((c1, c2))
        a, c_on = group_norm(P, p + "out_norm", h, G, GN_EPS, act="silu")
        feat = a.mean(axis=(2, 3))  # (N, C) global average pool: the features of the Frechet distance
        out, c_head = linear(P, p + "head", feat)
        keep += [c_on, c_head]
        return out, feat, (ConvNetCache(keep, a.shape) if keep_cache else None)

    def backward(self, dout, cache, dfeat=None):
        """dout (N, out_dim) (and optionally dfeat (N, C)) -> dx; parameter gradients go to params.grads."""
        if cache is None:
            raise ValueError("ConvNet.backward: run forward with keep_cache=True")
        cfg, P, p = self.config, self.params, self.prefix
        keep = list(cache.layers)
        df = linear_backward_named(P, p + "head", dout, keep.pop())
        if dfeat is not None:
            df = df + dfeat
        N, C, h, w = cache.pooled_shape
        # the mean over h*w positions: every position gets 1/(h*w) of the feature's gradient
        da = np.broadcast_to((df / (h * w))[:, :, None, None], (N, C, h, w)).copy()
        dh = group_norm_backward_named(P, p + "out_norm", da, keep.pop())
        for i in reversed(range(len(cfg.widths))):  # reverse order of forward
            for j in reversed(range(cfg.blocks_per_stage)):
                b = f"{p}stages.{i}.blocks.{j}."
                c1, c2 = keep.pop()
                dr = conv_backward(P, b + "conv", dh, c2)
                dh = dh + group_norm_backward_named(P, b + "norm", dr, c1)  # residual: identity path + branch
            if i > 0:
                c1, c2 = keep.pop()
                da = conv_backward(P, f"{p}stages.{i}.down", dh, c2)
                dh = group_norm_backward_named(P, f"{p}stages.{i}.down_norm", da, c1)
        return conv_backward(P, p + "stem", dh, keep.pop())

    def predict(self, x, batch_size=500):
        """x (N, C, H, W) -> (logits (N, out_dim), features (N, feature_dim)), in batches (inference, no caches)."""
        outs, feats = [], []
        for s in range(0, len(x), batch_size):
            o, f, _ = self.forward(x[s:s + batch_size])
            outs.append(o)
            feats.append(f)
        return np.concatenate(outs), np.concatenate(feats)


def cross_entropy(logits, labels):
    """Mean cross-entropy of logits (N, K) against integer labels (N,) -> (loss float, dlogits (N, K)).

    log-softmax with the row max subtracted, so exp never overflows; the gradient is (softmax - onehot) / N.
    """
    N = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)  # (N, K), max 0 per row
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))  # (N, 1)
    logp = z - lse
    loss = -float(logp[np.arange(N), labels].mean())
    d = np.exp(logp)  # softmax
    d[np.arange(N), labels] -= 1.0
    d /= N
    return loss, d.astype(logits.dtype, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# the training task


@register("classifier")
class ClassifierTask(Task):
    """Cross-entropy on the training set; evaluation: accuracy on the test set (eval_size images while training,
    all of it in the exported model's metadata)."""

    def build(self):
        from .recipes import build_config
        cfg = build_config("convnet", self.recipe["model"])
        C, H, W = self.data.image_shape
        if cfg.in_channels != C:
            raise self.error(f"model.in_channels is {cfg.in_channels} but the {self.recipe['dataset']} images have "
                             f"{C} channels")
        self.net = ConvNet(cfg, prefix="classifier.", rng=self.init_rng)
        self.models = {"classifier": self.net}

    def step(self, idx, rng):
        x, y = self.data.batch(idx, rng)
        logits, _, cache = self.net.forward(x, keep_cache=True)
        loss, dlogits = cross_entropy(logits, y)
        self.net.backward(dlogits, cache)
        return loss, {"acc": float((logits.argmax(1) == y).mean())}

    def evaluate(self, full=False):
        test = self.test_data()
        n = len(test) if full else min(len(test), self.recipe["eval_size"])
        x, y = test.batch(np.arange(n), augment=False)
        logits, _ = self.net.predict(x)
        return {"test_accuracy": float((logits.argmax(1) == y).mean()), "test_images": n}

    def export_meta(self):
        return {"kind": "classifier", "config": _cfg_dict(self.net.config), "dataset": self.recipe["dataset"],
                "class_names": list(self.data.class_names), "input_shape": list(self.data.image_shape),
                "prefix": self.net.prefix}


def _cfg_dict(cfg):
    from .recipes import config_to_dict
    return config_to_dict(cfg)


def load_classifier(tensors, meta, prefix=None):
    """A ConvNet from exported tensors and their "minisd_model" metadata (kind "classifier")."""
    cfg = ConvNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    prefix = prefix or meta.get("prefix", "classifier.")
    P = Params({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items() if k.startswith(prefix)})
    return ConvNet(cfg, prefix=prefix, params=P)

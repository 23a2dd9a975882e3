"""Offline evaluation of generated samples: classifier accuracy, Frechet distance in classifier features, CLIP score.

What these are, and what they are not:
  * accuracy          share of samples the minisd-trained ConvNet (classifier.py) assigns to the requested class.
  * Frechet distance  FD(A, B) = |mu_A - mu_B|^2 + tr(S_A + S_B - 2 (S_A S_B)^(1/2)) between Gaussians fitted to the
                      classifier's pooled features of the samples and of the real test set (Heusel et al. 2017, the
                      formula of FID). It is NOT FID: FID uses Inception-v3 features trained on ImageNet, which
                      cannot be downloaded here; these features come from a small MNIST/CIFAR classifier. Values
                      therefore compare minisd runs with each other (lower = closer to the test set) and are not
                      comparable with published FIDs. For scale, the same distance between held-out real images and
                      the test set is reported as `fd_real` (the floor a perfect generator would reach with that
                      many samples).
  * CLIP score        100 * mean cosine similarity between the tiny CLIP's image embedding of each sample and the
                      text embedding of its prompt (the torchmetrics convention of Hessel et al.'s CLIPScore,
                      without the max(., 0)); plus `clip_accuracy`, the share of samples whose best-matching digit
                      caption is the requested one.

tr((S_A S_B)^(1/2)) without scipy: S_A S_B is similar to the symmetric PSD matrix M = S_A^(1/2) S_B S_A^(1/2)
(S_A^(1/2) from an eigendecomposition), so the trace of its square root is the sum of sqrt(eigvalsh(M)). Computed
in float64; tiny negative eigenvalues from rounding are clipped to 0.

References:
  Heusel et al. 2017, GANs trained by a two time-scale update rule (FID), https://arxiv.org/abs/1706.08500 (eq. 6)
  Hessel et al. 2021, CLIPScore, https://arxiv.org/abs/2104.08718
Shapes: features (N, F); labels (N,); images (N, C, H, W) in [-1, 1].
"""
import numpy as np


def gaussian_stats(features):
    """Mean (F,) and covariance (F, F) of features (N, F), in float64 (unbiased, as FID implementations)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"gaussian_stats: need features (N >= 2, F), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(S):
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance(mu1, s1, mu2, s2):
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (module docstring). Returns a Python float."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, cov {s1.shape} / {s2.shape}")
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    m = (m + m.T) / 2  # symmetric up to rounding; make it exactly so for eigvalsh
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def feature_frechet(features_a, features_b):
    """Frechet distance between two feature sets (N, F) and (M, F)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def classifier_report(classifier, images, labels, reference_features, num_classes):
    """Accuracy (overall and per class) and Frechet distance of samples vs reference features.

    classifier: classifier.ConvNet; images (N, C, H, W) already in the classifier's input layout
    (data.eval_images); labels (N,) the requested classes; reference_features (M, F), e.g. the test set's.
    """
    logits, feats = classifier.predict(images)
    pred = logits.argmax(axis=1)
    labels = np.asarray(labels)
    per_class = {int(k): float((pred[labels == k] == k).mean()) for k in range(num_classes) if (labels == k).any()}
    return {"accuracy": float((pred == labels).mean()), "accuracy_per_class": per_class,
            "frechet_distance": feature_frechet(feats, reference_features), "samples": int(len(labels))}


def clip_report(clip, images, prompts, class_prompts=None, labels=None):
    """CLIP score of images (N, C, H, W) (in the image tower's input layout) against their prompts (N strings).
    class_prompts: one caption per class (K strings) and labels (N,): also the share whose best caption is theirs."""
    img = clip.image_embed(images)
    uniq = sorted(set(prompts))
    t = clip.text_embed(uniq)
    txt = t[[uniq.index(p) for p in prompts]]
    out = {"clip_score": float(100.0 * np.mean(np.sum(img * txt, axis=1)))}
    if class_prompts is not None and labels is not None:
        tc = clip.text_embed(list(class_prompts))
        out["clip_accuracy"] = float(((img @ tc.T).argmax(axis=1) == np.asarray(labels)).mean())
    return out

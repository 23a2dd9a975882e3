"""The images a recipe trains on: loading, padding, grey -> RGB, augmentation, and the inverse for evaluation.

Shapes: the dataset is kept as uint8 (N, C, H, W) (MNIST 47 MB, CIFAR-10 150 MB) and each batch is converted to
float32 in [-1, 1] on the fly (a float32 copy of CIFAR-10 would be 600 MB).
  pad p:  (N, C, H, W) -> (N, C, H+2p, W+2p), filled with black (-1). MNIST 28 -> 32 makes the size divisible by
          the VAE's 4x and the latent U-Net's 2x downsampling (the 8x8x4 latents of the shipped model).
  rgb:    (N, 1, H, W) -> (N, 3, H, W), the grey value repeated (the shipped model is RGB like every SD model).
`eval_images` undoes both for the classifier: generated (N, 3, 32, 32) -> (N, 1, 28, 28) grey, border cropped.
"""
import numpy as np

from ..datasets import CLASS_NAMES, load_dataset, to_float


class TrainData:
    """One split of a dataset prepared as a recipe says. `images` uint8 (N, C, H, W), `labels` int64 (N,)."""

    def __init__(self, recipe, data_dir=None, split="train"):
        self.dataset = recipe["dataset"]
        split_data = load_dataset(self.dataset, split, data_dir=data_dir)
        self.images, self.labels = split_data.images, split_data.labels
        self.pad, self.rgb, self.augment = recipe["pad"], recipe["rgb"], recipe["augment"]
        self.class_names = CLASS_NAMES[self.dataset]
        self.raw_shape = tuple(self.images.shape[1:])  # (C, H, W) as stored

    def __len__(self):
        return len(self.images)

    @property
    def image_shape(self):
        """(C, H, W) of the batches the model sees."""
        C, H, W = self.raw_shape
        return (3 if self.rgb else C, H + 2 * self.pad, W + 2 * self.pad)

    def batch(self, idx, rng=None, augment=True):
        """Images idx -> float32 (B, C, H, W) in [-1, 1] (padded, RGB, augmented with rng), labels (B,)."""
        x = prepare(self.images[idx], self.pad, self.rgb)
        if augment and self.augment != "none":
            if rng is None:
                raise ValueError("TrainData.batch: augmentation needs rng")
            x = augment_batch(x, self.augment, rng)
        return x, self.labels[idx]


def prepare(images_u8, pad=0, rgb=False):
    """uint8 (N, C, H, W) -> float32 (N, C', H+2p, W+2p) in [-1, 1]."""
    x = to_float(images_u8)  # (N, C, H, W) float32
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
    if rgb and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)  # (N, 3, H, W)
    return np.ascontiguousarray(x)


def augment_batch(x, kind, rng, max_shift=2):
    """flip: mirror left-right with p = 0.5 (CIFAR; never for digits). shift: translate each image by up to
    +-max_shift pixels in x and y, filling with black (-1). Draws from rng in a fixed order (resume-exact)."""
    if kind == "flip":
        flip = rng.random(x.shape[0]) < 0.5  # (N,)
        out = x.copy()
        out[flip] = x[flip][..., ::-1]
        return out
    if kind == "shift":
        N, C, H, W = x.shape
        s = max_shift
        padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=-1.0)  # (N, C, H+2s, W+2s)
        offs = rng.integers(0, 2 * s + 1, size=(N, 2))  # top-left corner of each crop
        out = np.empty_like(x)
        for i, (dy, dx) in enumerate(offs):
            out[i] = padded[i, :, dy:dy + H, dx:dx + W]
        return out
    raise ValueError(f"augment_batch: unknown augmentation {kind!r}")


def eval_images(x, target_shape):
    """Generated images float (N, C, H, W) in [-1, 1] -> the classifier's input layout `target_shape` (C', H', W'):
    RGB -> grey (mean of the channels) when C' = 1, and a centred crop (the padding added for the VAE) when the
    size is larger. Clipped to [-1, 1] as a saved image would be."""
    C, H, W = target_shape
    x = np.clip(x, -1.0, 1.0).astype(np.float32)
    if x.shape[1] != C:
        if C == 1:
            x = x.mean(axis=1, keepdims=True)  # (N, 1, H, W)
        elif x.shape[1] == 1:
            x = np.repeat(x, C, axis=1)
        else:
            raise ValueError(f"eval_images: cannot map {x.shape[1]} channels to {C}")
    dh, dw = x.shape[2] - H, x.shape[3] - W
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"eval_images: images of size {x.shape[2]}x{x.shape[3]} do not crop to {H}x{W}")
    if dh or dw:
        x = x[:, :, dh // 2:dh // 2 + H, dw // 2:dw // 2 + W]  # (N, C, H, W) centre crop
    return np.ascontiguousarray(x)

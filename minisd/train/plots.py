"""PNG output drawn with Pillow only (matplotlib is not a runtime dependency): image grids and the loss curve.

    image_grid(x, cols, row_labels)    x (N, C, H, W) floats in [-1, 1] -> uint8 (H', W', 3), small images upscaled
    save_png(array, path)              atomically (temp file + rename), so a viewer never sees half a PNG
    loss_curve(steps, losses, path)    log-scale y when the loss spans more than a decade; raw values in light
                                       blue, a centred moving average on top
"""
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BG = (255, 255, 255)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)
RAW = (170, 190, 220)
SMOOTH = (20, 70, 160)


def _font():
    return ImageFont.load_default()


def image_grid(x, cols, row_labels=None, min_side=56, gap=2):
    """Tile images x (N, C, H, W) in [-1, 1] into rows of `cols` -> uint8 (H', W', 3).

    Images smaller than min_side pixels are upscaled by an integer factor (nearest neighbour: pixels stay crisp).
    row_labels: one short text per row, drawn in a margin on the left.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"image_grid: x must be (N, C, H, W), got shape {x.shape}")
    u8 = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)  # (N, C, H, W)
    if u8.shape[1] == 1:
        u8 = np.repeat(u8, 3, axis=1)
    u8 = u8[:, :3].transpose(0, 2, 3, 1)  # (N, H, W, 3)
    N, H, W, _ = u8.shape
    k = max(1, math.ceil(min_side / max(H, W)))
    if k > 1:
        u8 = u8.repeat(k, axis=1).repeat(k, axis=2)  # (N, kH, kW, 3)
        H, W = H * k, W * k
    rows = math.ceil(N / cols)
    margin = 0
    if row_labels:
        margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(s), font=_font()))
                         for s in row_labels)
    out = np.full((rows * (H + gap) + gap, margin + cols * (W + gap) + gap, 3), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        y0, x0 = gap + r * (H + gap), margin + gap + c * (W + gap)
        out[y0:y0 + H, x0:x0 + W] = u8[i]
    if row_labels:
        img = Image.fromarray(out)
        d = ImageDraw.Draw(img)
        for r, s in enumerate(row_labels[:rows]):
            d.text((4, gap + r * (H + gap) + H // 2 - 6), str(s), fill=AXIS, font=_font())
        out = np.asarray(img)
    return out


def save_png(arr, path):
    """uint8 (H, W, 3) -> PNG at path, written to a temp file in the same folder and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _nice_step(span, target=6):
    """A round tick spacing (1, 2, 5 x 10^k) giving about `target` ticks over span."""
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v):
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


def smooth(values, log=False):
    """Centred moving average over about 1/25 of the curve (no lag, unlike an EMA), in log space for a log axis."""
    v = np.log(np.asarray(values, np.float64)) if log else np.asarray(values, np.float64)
    k = max(1, len(v) // 50)  # half-width
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo, hi = np.maximum(0, i - k), np.minimum(len(v), i + k + 1)
    out = (c[hi] - c[lo]) / (hi - lo)
    return np.exp(out) if log else out


def loss_curve(steps, losses, path, title="training loss", size=(800, 450)):
    """Draw loss against step and save it as a PNG. Non-finite values are skipped."""
    pts = [(float(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(v)]
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    font = _font()
    W, H = size
    left, right, top, bottom = 70, 20, 30, 45
    d.text((left, 8), title, fill=AXIS, font=font)
    if len(pts) < 2:
        d.text((left, H // 2), "not enough points yet", fill=AXIS, font=font)
        return save_png(np.asarray(img), path)
    xs, ys = zip(*pts)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    pos = [y for y in ys if y > 0]
    log = len(pos) == len(ys) and max(ys) / min(ys) > 10  # a log axis only when the loss spans a decade

    def ty(y):
        return math.log10(y) if log else y
    y0, y1 = min(ty(y) for y in ys), max(ty(y) for y in ys)
    if y1 == y0:
        y1 = y0 + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (ty(y) - y0) / (y1 - y0) * (H - top - bottom))

    # grid and ticks
    step = _nice_step(x1 - x0)
    t = math.ceil(x0 / step) * step
    while t <= x1:
        X = px(t, ys[0])[0]
        d.line([(X, top), (X, H - bottom)], fill=GRID)
        d.text((X - 10, H - bottom + 6), _fmt(t), fill=AXIS, font=font)
        t += step
    if log:
        ticks = [10 ** e * m for e in range(math.floor(y0) - 1, math.ceil(y1) + 1) for m in (1, 2, 5)]
        ticks = [v for v in ticks if y0 <= math.log10(v) <= y1]
    else:
        s = _nice_step(y1 - y0)
        ticks = [math.ceil(y0 / s) * s + i * s for i in range(int((y1 - y0) / s) + 2)]
        ticks = [v for v in ticks if y0 <= v <= y1]
    for v in ticks:
        Y = px(x0, v)[1]
        d.line([(left, Y), (W - right, Y)], fill=GRID)
        d.text((6, Y - 6), _fmt(v), fill=AXIS, font=font)
    d.rectangle([left, top, W - right, H - bottom], outline=AXIS)
    d.text((W // 2 - 12, H - 18), "step", fill=AXIS, font=font)
    if log:
        d.text((left + 4, top + 4), "log scale", fill=AXIS, font=font)
    d.line([px(x, y) for x, y in pts], fill=RAW, width=1)
    sm = smooth(ys, log)
    d.line([px(x, y) for x, y in zip(xs, sm)], fill=SMOOTH, width=2)
    return save_png(np.asarray(img), path)

"""Tiny CLIP: an image ConvNet and minisd's CLIP text transformer trained together with the contrastive loss.

Stable Diffusion conditions on a CLIP text encoder that was trained contrastively on image-text pairs; this is that
recipe at MNIST scale. Each MNIST image is paired with a caption drawn at random from CAPTION_TEMPLATES for its
digit ("a handwritten digit seven", "7", "the number seven", ...). Both towers embed into the same P-dim space:

    image:  ConvNet (classifier.py, out_dim = P, no bias)                x (N, 1, 28, 28) -> (N, P)
    text:   CLIPTextModel (models/clip.py, hf layout, BPE tokenizer)       ids (N, L) -> hidden (N, L, D)
            -> final-norm state at the first end-of-text token -> text_projection   -> (N, P)
    loss:   a_i = img_i / |img_i|, b_j = txt_j / |txt_j|, logits = exp(t) a b^T  (N, N), t = learned log-scale
            L = (CE(logits, arange N) + CE(logits^T, arange N)) / 2     (CLIP's symmetric InfoNCE)

Deviation kept on purpose: a batch holds several images of the same digit, so some "negatives" are true matches.
CLIP has the same issue in principle; at 10 classes it only puts a floor under the loss (about log of the images
per class in a batch) and does not stop the classes from aligning.

Causality makes text training cheap: the pooled feature at the end-of-text token only sees tokens before it, so a
batch is truncated to its longest caption (e.g. 8 of 77 tokens) with exactly the same result. The latent diffusion
model reads all 77 hidden states of the frozen encoder, as SD does (caption_table).

Zero-shot classification (the figure the issue asks for): each test image is assigned the class whose caption
"a handwritten digit <name>" has the highest cosine similarity. CLIP score (metrics.py) reuses the same towers.

References:
  Radford et al. 2021, CLIP, https://arxiv.org/abs/2103.00020 (Figure 3 pseudocode; logit scale init 1/0.07, clamp 100)
  https://github.com/openai/CLIP/blob/d05afc43/clip/model.py (encode_text: x[arange, eot argmax] @ text_projection)
Glossary: N=batch, L=tokens, D=text width, P=embedding width, K=classes.
"""
import math

import numpy as np

from ..models.clip import CLIPTextModel
from ..nn import Params
from ..tokenizer import CLIPTokenizer
from .classifier import ConvNet
from .recipes import build_config, config_to_dict
from .task import Task, register

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {name}", "a handwritten {name}", "{digit}", "{name}", "the number {name}",
    "the number {digit}", "the digit {digit}", "a handwritten number {digit}", "a drawing of the number {name}",
    "an image of a {name}", "a {name}", "handwritten {digit}", "a scribbled {name}", "a photo of the digit {name}",
    "the numeral {digit}", "a black and white picture of a {name}",
)
ZERO_SHOT_TEMPLATE = "a handwritten digit {name}"
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature so logits stay <= 100
IMAGE_PREFIX = "clip_image."
SCALE_KEY = "clip.logit_scale"


def class_words(class_names):
    """(names, digits) used by the templates: MNIST's "7" -> ("seven", "7"); other datasets use their names."""
    if tuple(class_names) == tuple(str(i) for i in range(10)):
        return list(DIGIT_NAMES), list(class_names)
    return list(class_names), [str(i) for i in range(len(class_names))]


def fill(template, k, class_names):
    names, digits = class_words(class_names)
    return template.format(name=names[k], digit=digits[k])


class _Scalar:
    """A holder so the learned log-temperature is a 'model' with .params like the two towers."""

    def __init__(self, value, dtype=np.float32):
        # shape (1,), not 0-d: every optimizer buffer stays a real array (NumPy turns 0-d results into scalars)
        self.params = Params({SCALE_KEY: np.array([value], dtype=dtype)}, compute_dtype=dtype)


class CLIPParts:
    """The two towers + the temperature, and the embedding functions used by training, eval and the latent task."""

    def __init__(self, text, image, scale, tokenizer=None):
        self.text, self.image, self.scale = text, image, scale
        self.tokenizer = tokenizer or CLIPTokenizer.sd1()

    @classmethod
    def from_file(cls, f):
        """From an exported CLIP file (checkpoints.ModelFile of kind "clip")."""
        tcfg = build_config("clip_text", f.meta["text"])
        icfg = build_config("convnet", f.meta["image"])
        text = CLIPTextModel(tcfg, params=f.params("cond_stage_model."))
        image = ConvNet(icfg, prefix=IMAGE_PREFIX, params=f.params(IMAGE_PREFIX))
        scale = _Scalar(np.asarray(f.tensors[SCALE_KEY]).item())
        return cls(text, image, scale)

    def tokens(self, prompts):
        return self.tokenizer(list(prompts))  # (N, 77) int64

    def encode_text_hidden(self, prompts):
        """All 77 hidden states after the final LayerNorm: the diffusion model's context (N, 77, D)."""
        return self.text.forward(self.tokens(prompts))[0]

    def text_embed(self, prompts, batch_size=256):
        """Unit-norm text embeddings (N, P)."""
        out = []
        for s in range(0, len(prompts), batch_size):
            ids = truncate(self.tokens(prompts[s:s + batch_size]))
            hidden, _ = self.text.forward(ids)
            pooled, _ = self.text.pooled(hidden, ids)
            proj, _ = self.text.project(pooled)
            out.append(proj)
        e = np.concatenate(out)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def image_embed(self, x, batch_size=500):
        """Unit-norm image embeddings (N, P) of images x (N, C, H, W) in the image tower's input layout."""
        e, _ = self.image.predict(x, batch_size)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def zero_shot(self, x, class_names, template=ZERO_SHOT_TEMPLATE):
        """Predicted class of each image: argmax cosine similarity with one caption per class. (N,) int64."""
        t = self.text_embed([fill(template, k, class_names) for k in range(len(class_names))])  # (K, P)
        return (self.image_embed(x) @ t.T).argmax(axis=1)


def truncate(ids):
    """(N, 77) -> (N, L) with L = the longest caption including its end-of-text token. Exact for the pooled feature
    (causal attention: position i never sees positions > i)."""
    eos = (ids == 49407).argmax(axis=1)  # the first end-of-text token of each row
    return ids[:, :int(eos.max()) + 1]


def caption_table(clip, templates, class_names):
    """Hidden states of every (class, template) caption and of "" -> (K, T, 77, D) and (77, D)."""
    K, T = len(class_names), len(templates)
    prompts = [fill(t, k, class_names) for k in range(K) for t in templates]
    h = clip.encode_text_hidden(prompts)  # (K*T, 77, D)
    null = clip.encode_text_hidden([""])[0]  # (77, D): SD's unconditional prompt is the empty string
    return h.reshape(K, T, *h.shape[1:]), null


def clip_loss(img, txt, log_scale):
    """Symmetric contrastive loss. img, txt (N, P) raw embeddings; log_scale: (1,) array, the log temperature.

    Returns (loss float, dimg (N, P), dtxt (N, P), dlog_scale (1,), accuracy of the image->text argmax).
    Backward of the L2 normalisation a = x / |x|: dx = (da - a <da, a>) / |x|.
    """
    N = img.shape[0]
    ni = np.linalg.norm(img, axis=1, keepdims=True)  # (N, 1)
    nt = np.linalg.norm(txt, axis=1, keepdims=True)
    a, b = img / ni, txt / nt
    t = np.asarray(log_scale).item()
    clamped = t > LOGIT_SCALE_MAX
    s = np.asarray(math.exp(min(t, LOGIT_SCALE_MAX)), dtype=img.dtype)
    logits = s * (a @ b.T)  # (N, N): row i = image i against every caption
    labels = np.arange(N)

    def ce(z):  # mean cross-entropy with target = the diagonal -> (loss, dz)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        d = np.exp(logp)
        d[labels, labels] -= 1.0
        return -float(logp[labels, labels].mean()), d / N

    l_i, d_i = ce(logits)
    l_t, d_t = ce(logits.T)
    dlogits = (0.5 * d_i + 0.5 * d_t.T).astype(img.dtype)  # (N, N)
    da = s * (dlogits @ b)
    db = s * (dlogits.T @ a)
    dlog = np.array([0.0 if clamped else float(np.sum(dlogits * logits))], dtype=img.dtype)  # d logits/dt = logits
    dimg = (da - a * np.sum(da * a, axis=1, keepdims=True)) / ni
    dtxt = (db - b * np.sum(db * b, axis=1, keepdims=True)) / nt
    acc = float((logits.argmax(axis=1) == labels).mean())
    return 0.5 * (l_i + l_t), dimg, dtxt, dlog, acc


@register("clip")
class CLIPTask(Task):

    def build(self):
        r = self.recipe
        tcfg = build_config("clip_text", r["text"])
        icfg = build_config("convnet", r["image"])
        if tcfg.projection_dim != icfg.out_dim:
            raise self.error(f"text.projection_dim ({tcfg.projection_dim}) must equal image.out_dim ({icfg.out_dim})"
                             f": both towers embed into the same space")
        if icfg.head_bias:
            raise self.error("image.head_bias must be false (CLIP's projections have no bias)")
        if tcfg.layout != "hf":
            raise self.error("text.layout must be \"hf\" (the SD 1.x names the shipped model uses)")
        C = self.data.image_shape[0]
        if icfg.in_channels != C:
            raise self.error(f"image.in_channels must be {C} for these images")
        text = CLIPTextModel(tcfg, rng=self.init_rng)
        image = ConvNet(icfg, prefix=IMAGE_PREFIX, rng=self.init_rng)
        self.clip = CLIPParts(text, image, _Scalar(r["logit_scale_init"]))
        self.models = {"text": text, "image": image, "scale": self.clip.scale}
        self.templates = list(r["captions"]) or list(CAPTION_TEMPLATES)
        names = list(self.data.class_names)
        # every (class, template) caption tokenized once: (K, T, 77)
        self.ids = np.stack([self.clip.tokens([fill(t, k, names) for t in self.templates])
                             for k in range(len(names))])

    def step(self, idx, rng):
        x, y = self.data.batch(idx, rng)
        tmpl = rng.integers(0, len(self.templates), size=len(idx))  # one random caption per image
        ids = truncate(self.ids[y, tmpl])  # (N, L)
        text, image, P = self.clip.text, self.clip.image, self.clip.scale.params
        img, _, icache = image.forward(x, keep_cache=True)
        hidden, tcache = text.forward(ids, keep_cache=True)
        pooled, pos = text.pooled(hidden, ids)  # (N, D), index of the end-of-text token
        txt, pcache = text.project(pooled)
        loss, dimg, dtxt, dlog, acc = clip_loss(img, txt, P[SCALE_KEY])
        image.backward(dimg, icache)
        dpooled = text.project_backward(dtxt, pcache)
        dhidden = np.zeros_like(hidden)
        dhidden[np.arange(len(ids)), pos] = dpooled  # only the pooled position received a gradient
        text.backward(dhidden, tcache)
        P.add_grad(SCALE_KEY, dlog)
        return loss, {"acc": acc, "scale": math.exp(min(P[SCALE_KEY].item(), LOGIT_SCALE_MAX))}

    def evaluate(self, full=False):
        test = self.test_data()
        n = len(test) if full else min(len(test), self.recipe["eval_size"])
        x, y = test.batch(np.arange(n), augment=False)
        pred = self.clip.zero_shot(x, self.data.class_names)
        return {"zero_shot_accuracy": float((pred == y).mean()), "test_images": n}

    def export_meta(self):
        return {"kind": "clip", "text": config_to_dict(self.clip.text.config),
                "image": config_to_dict(self.clip.image.config), "captions": self.templates,
                "zero_shot_template": ZERO_SHOT_TEMPLATE, "dataset": self.recipe["dataset"],
                "class_names": list(self.data.class_names), "image_shape": list(self.data.image_shape),
                "pad": self.recipe["pad"], "rgb": self.recipe["rgb"]}

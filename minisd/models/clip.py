"""The CLIP text transformer that conditions Stable Diffusion, forward and hand-written backward.

SD 1.x uses OpenAI's ViT-L/14 text tower through Hugging Face's CLIPTextModel (12 layers, width 768, 12 heads,
quick_gelu); SD 2.x uses OpenCLIP's ViT-H/14 text tower (24 layers, width 1024, 16 heads, exact GELU) and takes
the *penultimate* layer's output, then the final LayerNorm. Both are the same pre-LN causal transformer; only
the parameter names differ, so one implementation serves both `layout`s:
  hf:       cond_stage_model.transformer.text_model.encoder.layers.{i}.self_attn.q_proj.weight ...
  openclip: cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_weight (q, k, v stacked by rows) ...
References:
  https://github.com/openai/CLIP/blob/d05afc43/clip/model.py (Transformer, build_attention_mask, QuickGELU)
  https://github.com/huggingface/transformers/blob/v4.40.0/src/transformers/models/clip/modeling_clip.py
  https://github.com/Stability-AI/stablediffusion/blob/cf1d67a6/ldm/modules/encoders/modules.py (penultimate)
../shared/docs/sd-reference.md §1.4-1.6 has the exact hyper-parameters.

Shapes: ids (N, L) int64 token ids (L = 77 for SD) -> hidden states (N, L, D); pooled (N, D) or projected (N, P).
"""
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ..backend import xp_of
from ..nn import Params, init_params
from ..ops.activations import (gelu_backward, gelu_forward, quick_gelu_backward, quick_gelu_forward)
from ..ops.attention import attention_backward, attention_forward
from ..ops.linear import embedding_backward, embedding_forward, linear_backward, linear_forward
from .common import layer_norm, layer_norm_backward_named, linear, linear_backward_named

PREFIXES = {"hf": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
EOS_ID = 49407  # <|endoftext|>: the pooled feature is taken at its first occurrence


@dataclass(frozen=True)
class CLIPTextConfig:
    """Text-encoder hyper-parameters, named as Hugging Face's CLIPTextConfig (SD1's FrozenCLIPEmbedder uses it)."""
    vocab_size: int = 49408  # BPE vocabulary (+ textual-inversion tokens appended at the end)
    max_position_embeddings: int = 77  # context length, e.g. 77
    hidden_size: int = 768  # width D, e.g. 768 (CLIP-L), 1024 (OpenCLIP-H)
    intermediate_size: int = 3072  # MLP width, e.g. 4*D
    num_hidden_layers: int = 12  # e.g. 12 (CLIP-L), 24 (OpenCLIP-H)
    num_attention_heads: int = 12  # e.g. 12 (CLIP-L), 16 (OpenCLIP-H)
    hidden_act: str = "quick_gelu"  # "quick_gelu" (x*sigmoid(1.702x), CLIP-L) or "gelu" (exact, OpenCLIP-H)
    layer_norm_eps: float = 1e-5
    layout: str = "hf"  # parameter names: "hf" (SD1 files) or "openclip" (SD2 files)
    clip_skip: int = 0  # layers skipped at the end by default: 0 (SD1), 1 = penultimate (SD2)
    projection_dim: Optional[int] = None  # text_projection width (OpenCLIP-H: 1024; contrastive training)

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPTextConfig: hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}")
        if self.layout not in PREFIXES:
            raise ValueError(f"CLIPTextConfig: layout must be one of {list(PREFIXES)}, got {self.layout!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("CLIPTextConfig: hidden_size must be divisible by num_attention_heads")
        if not 0 <= self.clip_skip < self.num_hidden_layers:
            raise ValueError(f"CLIPTextConfig: clip_skip must be in [0, {self.num_hidden_layers})")


SD15 = CLIPTextConfig()
SD21 = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      hidden_act="gelu", layout="openclip", clip_skip=1, projection_dim=1024)
TINY = CLIPTextConfig(vocab_size=49408, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2)
TINY_OPENCLIP = dataclasses.replace(TINY, hidden_act="gelu", layout="openclip", clip_skip=1, projection_dim=10,
                                    num_hidden_layers=3)
MNIST = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=64)
PRESETS = {"SD15": SD15, "SD21": SD21, "TINY": TINY, "TINY_OPENCLIP": TINY_OPENCLIP, "MNIST": MNIST}


def _names(cfg):
    """Role -> key (without prefix) for the embeddings and final norm, and a function giving layer i's keys."""
    if cfg.layout == "hf":
        top = {"tok": "text_model.embeddings.token_embedding.weight",
               "pos": "text_model.embeddings.position_embedding.weight",
               "ln_f": "text_model.final_layer_norm", "proj": "text_projection.weight"}

        def layer(i):
            b = f"text_model.encoder.layers.{i}."
            return {"ln1": b + "layer_norm1", "ln2": b + "layer_norm2", "q": b + "self_attn.q_proj",
                    "k": b + "self_attn.k_proj", "v": b + "self_attn.v_proj", "o": b + "self_attn.out_proj",
                    "fc1": b + "mlp.fc1", "fc2": b + "mlp.fc2"}
    else:
        top = {"tok": "token_embedding.weight", "pos": "positional_embedding", "ln_f": "ln_final",
               "proj": "text_projection", "logit_scale": "logit_scale"}

        def layer(i):
            b = f"transformer.resblocks.{i}."
            return {"ln1": b + "ln_1", "ln2": b + "ln_2", "qkv": b + "attn.in_proj", "o": b + "attn.out_proj",
                    "fc1": b + "mlp.c_fc", "fc2": b + "mlp.c_proj"}
    return top, layer


def param_shapes(cfg, prefix=None):
    prefix = PREFIXES[cfg.layout] if prefix is None else prefix
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings
    top, layer = _names(cfg)
    s = {top["tok"]: (V, D), top["pos"]: (L, D)}
    for i in range(cfg.num_hidden_layers):
        n = layer(i)
        if cfg.layout == "hf":
            for r in ("q", "k", "v", "o"):
                s.update({n[r] + ".weight": (D, D), n[r] + ".bias": (D,)})
            s.update({n["ln1"] + ".weight": (D,), n["ln1"] + ".bias": (D,),
                      n["fc1"] + ".weight": (F, D), n["fc1"] + ".bias": (F,),
                      n["fc2"] + ".weight": (D, F), n["fc2"] + ".bias": (D,),
                      n["ln2"] + ".weight": (D,), n["ln2"] + ".bias": (D,)})
        else:
            s.update({n["qkv"] + "_weight": (3 * D, D), n["qkv"] + "_bias": (3 * D,),
                      n["o"] + ".weight": (D, D), n["o"] + ".bias": (D,),
                      n["ln1"] + ".weight": (D,), n["ln1"] + ".bias": (D,),
                      n["ln2"] + ".weight": (D,), n["ln2"] + ".bias": (D,),
                      n["fc1"] + ".weight": (F, D), n["fc1"] + ".bias": (F,),
                      n["fc2"] + ".weight": (D, F), n["fc2"] + ".bias": (D,)})
    s.update({top["ln_f"] + ".weight": (D,), top["ln_f"] + ".bias": (D,)})
    if cfg.projection_dim is not None:
        if cfg.layout == "hf":
            s[top["proj"]] = (cfg.projection_dim, D)  # nn.Linear(D, P, bias=False): y = x @ W.T
        else:
            s[top["proj"]] = (D, cfg.projection_dim)  # OpenCLIP parameter: y = x @ W
            s[top["logit_scale"]] = ()
    return {prefix + k: v for k, v in s.items()}


class LayerCache(NamedTuple):
    c_ln1: tuple
    c_qkv: tuple  # linear caches: (q, k, v) for hf, (qkv,) for openclip
    c_att: tuple
    c_o: tuple
    c_ln2: tuple
    c_fc1: tuple
    c_act: tuple
    c_fc2: tuple


class CLIPTextModel:
    """CLIP text transformer: `params` keyed by the checkpoint's names and `config`.

    forward(ids) -> (hidden (N, L, D) after the final LayerNorm, cache); backward(dhidden, cache) puts parameter
    gradients (token and position embeddings included) into params.grads. `pooled`/`project` give the contrastive
    text feature (the final-norm state at the first end-of-text token, times text_projection).
    """

    def __init__(self, config=SD15, params=None, rng=None, dtype=np.float32, prefix=None):
        self.config = config
        self.prefix = PREFIXES[config.layout] if prefix is None else prefix
        shapes = param_shapes(config, self.prefix)
        if params is None:
            rng = np.random.default_rng(0) if rng is None else rng
            top, _ = _names(config)
            normal = (top["tok"], top["pos"], top["proj"])  # CLIP initialises embeddings with N(0, 0.02)
            t = init_params(shapes, rng, dtype, normal=normal)
            if config.layout == "openclip" and config.projection_dim is not None:
                t[self.prefix + "logit_scale"] = np.array(np.log(1 / 0.07), dtype=dtype)  # CLIP's initial value
            params = Params(t, compute_dtype=dtype)
        elif params.shapes() != shapes:
            Params({k: np.empty(0) for k in shapes}).load_state_dict(
                {k: np.empty(v) for k, v in params.shapes().items()})  # raises with a listing
        self.params = params

    @classmethod
    def from_weights(cls, params, prefix=None, **overrides):
        return cls(config_from_shapes(params.shapes(), prefix, **overrides), params=params, prefix=prefix)

    def _key(self, role):
        return self.prefix + _names(self.config)[0][role]

    def _act(self):
        if self.config.hidden_act == "quick_gelu":
            return quick_gelu_forward, quick_gelu_backward
        return gelu_forward, gelu_backward

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, ids, clip_skip=None, keep_cache=False, trace=None):
        """ids (N, L) integer token ids, L <= max_position_embeddings -> (hidden (N, L, D), cache).

        clip_skip: skip this many final layers (None: the config's default; SD2 = 1, the penultimate layer).
        The final LayerNorm is applied to whichever layer is last, as SD2 and diffusers' clip_skip both do.
        trace: optional callback trace(name, array) after "embeddings", each "layers.i" and "final_layer_norm".
        """
        cfg, P = self.config, self.params
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: ids must be (N, L) with L <= {cfg.max_position_embeddings}, got "
                             f"{ids.shape}; the tokenizer truncates prompts to 77 tokens")
        skip = cfg.clip_skip if clip_skip is None else clip_skip
        if not 0 <= skip < cfg.num_hidden_layers:
            raise ValueError(f"CLIPTextModel: clip_skip must be in [0, {cfg.num_hidden_layers}), got {skip}")
        N, L = ids.shape
        x, c_tok = embedding_forward(ids, P[self._key("tok")])  # (N, L, D)
        x = x + P[self._key("pos")][:L]  # learned positions; checkpoints' position_ids buffers are ignored
        trace and trace("embeddings", x)
        _, layer = _names(cfg)
        caches = []
        for i in range(cfg.num_hidden_layers - skip):
            x, c = self._layer_forward(layer(i), x)
            keep_cache and caches.append(c)
            trace and trace(f"layers.{i}", x)
        h, c_lnf = layer_norm(P, self._key("ln_f"), x, cfg.layer_norm_eps)
        trace and trace("final_layer_norm", h)
        return h, ((c_tok, caches, c_lnf, (N, L)) if keep_cache else None)

    def _layer_forward(self, n, x):
        """Pre-LN residual block: x += attn(ln_1(x)) (causal); x += mlp(ln_2(x)). x (N, L, D)."""
        cfg, P, p = self.config, self.params, self.prefix
        D = cfg.hidden_size
        h, c_ln1 = layer_norm(P, p + n["ln1"], x, cfg.layer_norm_eps)
        if cfg.layout == "hf":
            q, c_q = linear(P, p + n["q"], h)
            k, c_k = linear(P, p + n["k"], h)
            v, c_v = linear(P, p + n["v"], h)
            c_qkv = (c_q, c_k, c_v)
        else:  # OpenCLIP stacks q, k, v weights by rows in one in_proj: one GEMM, then split the columns
            qkv, c = linear_forward(h, P[p + n["qkv"] + "_weight"], P[p + n["qkv"] + "_bias"])  # (N, L, 3D)
            q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
            c_qkv = (c,)
        a, c_att = attention_forward(q, k, v, cfg.num_attention_heads, causal=True)  # token i sees tokens <= i
        a, c_o = linear(P, p + n["o"], a)
        x = x + a
        h, c_ln2 = layer_norm(P, p + n["ln2"], x, cfg.layer_norm_eps)
        h, c_fc1 = linear(P, p + n["fc1"], h)
        h, c_act = self._act()[0](h)
        h, c_fc2 = linear(P, p + n["fc2"], h)
        return x + h, LayerCache(c_ln1, c_qkv, c_att, c_o, c_ln2, c_fc1, c_act, c_fc2)

    # ------------------------------------------------------------------------------------------------ backward
    def backward(self, dh, cache):
        """dh (N, L, D): gradient of the hidden states forward returned. Parameter gradients go to params.grads;
        token ids have no gradient, so nothing is returned."""
        if cache is None:
            raise ValueError("CLIPTextModel.backward: run forward with keep_cache=True")
        cfg, P = self.config, self.params
        c_tok, caches, c_lnf, (N, L) = cache
        dx = layer_norm_backward_named(P, self._key("ln_f"), dh, c_lnf)
        _, layer = _names(cfg)
        for i in reversed(range(len(caches))):  # reverse order of forward
            dx = self._layer_backward(layer(i), dx, caches[i])
        pos = P.data[self._key("pos")]
        dpos = xp_of(dx).zeros(pos.shape, dtype=dx.dtype)  # on dx's device (numpy or cupy)
        dpos[:L] = dx.sum(axis=0)  # the same position rows are added to every sequence in the batch
        P.add_grad(self._key("pos"), dpos)
        P.add_grad(self._key("tok"), embedding_backward(dx, c_tok))

    def _layer_backward(self, n, dy, c):
        cfg, P, p = self.config, self.params, self.prefix
        dx = dy.copy()  # residual; branch gradients are added below
        dh = linear_backward_named(P, p + n["fc2"], dy, c.c_fc2)
        dh = self._act()[1](dh, c.c_act)
        dh = linear_backward_named(P, p + n["fc1"], dh, c.c_fc1)
        dx += layer_norm_backward_named(P, p + n["ln2"], dh, c.c_ln2)
        da = linear_backward_named(P, p + n["o"], dx, c.c_o)
        dq, dk, dv = attention_backward(da, c.c_att)
        if cfg.layout == "hf":
            dh = linear_backward_named(P, p + n["q"], dq, c.c_qkv[0])
            dh += linear_backward_named(P, p + n["k"], dk, c.c_qkv[1])
            dh += linear_backward_named(P, p + n["v"], dv, c.c_qkv[2])
        else:
            dqkv = np.concatenate([dq, dk, dv], axis=-1)  # undo the column split of the fused projection
            dh, dw, db = linear_backward(dqkv, c.c_qkv[0])
            P.add_grad(p + n["qkv"] + "_weight", dw)
            P.add_grad(p + n["qkv"] + "_bias", db)
        dx += layer_norm_backward_named(P, p + n["ln1"], dh, c.c_ln1)
        return dx

    # ----------------------------------------------------------------------------------- contrastive features
    def pooled(self, hidden, ids, eos_id=EOS_ID):
        """The final-norm state at each sequence's first end-of-text token: hidden (N, L, D) -> (N, D), index (N,).
        (CLIP's `x[arange(N), ids.argmax(-1)]`: with SD1's padding by EOS, argmax finds the first EOS too.)"""
        ids = np.asarray(ids)
        is_eos = ids == eos_id
        if not is_eos.any(axis=1).all():
            raise ValueError("CLIPTextModel.pooled: every sequence needs an end-of-text token")
        idx = is_eos.argmax(axis=1)
        return hidden[np.arange(len(ids)), idx], idx

    def project(self, pooled):
        """pooled (N, D) -> (N, P) through text_projection (linear, no bias), with its cache."""
        w = self.params[self._key("proj")]
        if self.config.layout == "openclip":
            w = w.T  # OpenCLIP stores (D, P) and computes x @ W
        return linear_forward(pooled, w)

    def project_backward(self, dy, cache):
        """dy (N, P) -> dpooled (N, D); the projection's gradient goes to params.grads."""
        dx, dw, _ = linear_backward(dy, cache)
        P = self.params
        P.add_grad(self._key("proj"), dw.T.copy() if self.config.layout == "openclip" else dw)
        return dx

    # ------------------------------------------------------------------------------------ textual inversion
    def add_token_embeddings(self, vectors):
        """Append rows (k, D) to the token embedding table (textual-inversion tokens get ids V, V+1, ...).
        Returns the new ids. The config's vocab_size grows accordingly."""
        vectors = np.asarray(vectors, dtype=self.params.compute_dtype)
        D = self.config.hidden_size
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != D:
            raise ValueError(f"add_token_embeddings: vectors must be (k, {D}) for this text encoder, got "
                             f"{vectors.shape} (an SD1 embedding has width 768, SD2 1024)")
        key = self._key("tok")
        table = self.params.data[key]
        V = table.shape[0]
        self.params.data[key] = np.concatenate([table, vectors.astype(table.dtype)], axis=0)
        self.config = dataclasses.replace(self.config, vocab_size=V + len(vectors))
        return list(range(V, V + len(vectors)))


def config_from_shapes(shapes, prefix=None, **overrides):
    """Infer a CLIPTextConfig from shapes: the layout from the key names, sizes from the tables. Heads and the
    activation are not visible in shapes: width 768 -> 12 heads, quick_gelu (CLIP-L); 1024 -> 16 heads, GELU,
    penultimate layer (OpenCLIP-H); other widths need overrides (num_attention_heads=..., hidden_act=...)."""
    layout = None
    for lay, pre in PREFIXES.items():
        p = pre if prefix is None else prefix
        if any(k.startswith(p) and ("token_embedding" in k) for k in shapes):
            if lay == "hf" and p + "text_model.embeddings.token_embedding.weight" in shapes:
                layout, prefix = lay, p
            elif lay == "openclip" and p + "token_embedding.weight" in shapes:
                layout, prefix = lay, p
            if layout:
                break
    if layout is None:
        raise ValueError("text encoder weights: no token embedding found under 'cond_stage_model.transformer.' "
                         "(SD1) or 'cond_stage_model.model.' (SD2)")
    top, layer = _names(CLIPTextConfig(layout=layout))
    V, D = shapes[prefix + top["tok"]]
    Lmax = shapes[prefix + top["pos"]][0]
    marker = "text_model.encoder.layers." if layout == "hf" else "transformer.resblocks."
    n_layers = 1 + max(int(k[len(prefix + marker):].split(".")[0]) for k in shapes if k.startswith(prefix + marker))
    F = shapes[prefix + layer(0)["fc1"] + ".weight"][0]
    proj = shapes.get(prefix + top["proj"])
    proj_dim = None if proj is None else (proj[0] if layout == "hf" else proj[1])
    defaults = {768: dict(num_attention_heads=12, hidden_act="quick_gelu"),
                1024: dict(num_attention_heads=16, hidden_act="gelu")}.get(D, {})
    kw = dict(vocab_size=V, max_position_embeddings=Lmax, hidden_size=D, intermediate_size=F,
              num_hidden_layers=n_layers, layout=layout, clip_skip=1 if layout == "openclip" else 0,
              projection_dim=proj_dim, **defaults)
    kw.update(overrides)
    if "num_attention_heads" not in kw:
        raise ValueError(f"text encoder of width {D}: pass num_attention_heads (not visible in the weights)")
    cfg = CLIPTextConfig(**kw)
    expected = param_shapes(cfg, prefix)
    got = {k: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    if expected != got:
        bad = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and expected[k] != got[k]]
        raise ValueError(f"text encoder weights do not match the inferred config: {len(bad)} keys differ, first: "
                         f"{bad[:5]}")
    return cfg

# Source of notebooks/06_clip.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 6. CLIP: from a prompt to the numbers the U-Net attends to
#
# The prompt reaches Stable Diffusion's U-Net through three steps: the **tokenizer** turns text into 77 integer ids,
# the **text transformer** (CLIP's text tower, causal) turns the ids into 77 vectors, and **cross-attention** in
# every U-Net transformer block lets each image location read from those vectors. This notebook walks through the
# three with minisd's [`tokenizer.py`](../minisd/tokenizer.py), [`models/clip.py`](../minisd/models/clip.py) and
# the tiny text-conditioned model that ships with minisd (trained on MNIST with captions such as
# "a handwritten seven"). About 30 s; needs only the default model (`MINISD_MODEL` picks another).

# %%
import numpy as np
import matplotlib.pyplot as plt

from minisd.diffusion import make_sampler
from minisd.pipeline import decode, guide
from minisd.tokenizer import CLIPTokenizer, bytes_to_unicode, pre_tokenize
from nbutil import load_default_model

tok = CLIPTokenizer.sd1()  # SD 1.x's tokenizer: the CLIP BPE vocabulary of 49,408 tokens
model = load_default_model()

# %% [markdown]
# ## Tokenization, step by step
#
# **1. Cleanup.** `ftfy` repairs broken Unicode (when installed), runs of white space collapse to one space, and
# everything is lowercased: CLIP's vocabulary has no capitals.
#
# **2. Pre-tokens.** CLIP's split regex cuts the text into runs of letters, single digits, runs of other symbols,
# and English contractions; white space disappears (it is encoded by the end-of-word mark below instead).

# %%
prompt = "A  handwritten SEVEN, drawn quickly!!"
clean = tok.clean(prompt)
words = pre_tokenize(clean)
print(f"prompt      {prompt!r}\ncleaned     {clean!r}\npre-tokens  {words}")

# %% [markdown]
# **3. Bytes.** Each pre-token is taken as UTF-8 bytes, and each byte is shown as one printable character
# (`bytes_to_unicode`: printable bytes stand for themselves, the others, such as the space, get stand-ins from
# U+0100 on). This is what makes the tokenizer *byte-level*: any string, in any script, can be encoded, because
# the 256 bytes are all in the vocabulary.
#
# **4. BPE merges.** Start from the word's characters, the last one marked end-of-word (`</w>`). The vocabulary
# file lists 48,894 merges in the order they were learned from CLIP's training text; the most frequent pairs come
# first. Repeatedly merge the adjacent pair that comes *earliest* in that list, until no adjacent pair is in it.
# The loop below writes that rule out with the tokenizer's own merge table (`tok.vocab.ranks`: pair -> position in
# the list) so we can watch it; the last line checks it against `tok.tokenize`.

# %%
byte_char = bytes_to_unicode()
ranks = tok.vocab.ranks  # (left, right) -> rank: the order in which the merges were learned


def bpe_steps(word):
    """The symbol sequence after each merge of CLIP's greedy BPE (the rule of minisd.tokenizer._Vocab.bpe)."""
    chars = "".join(byte_char[b] for b in word.encode("utf-8"))
    symbols = list(chars[:-1]) + [chars[-1] + "</w>"]
    steps = [symbols]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, np.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == np.inf:
            break
        first, second = next(p for p in zip(symbols, symbols[1:]) if ranks.get(p) == rank)
        merged, i = [], 0
        while i < len(symbols):  # merge every occurrence of the chosen pair, left to right
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
        steps.append((f"merge #{int(rank):5d}: {first!r} + {second!r}", symbols))
    return steps


for word in ("handwritten", "quickly"):
    steps = bpe_steps(word)
    print(f"{word!r}: start {steps[0]}")
    for how, symbols in steps[1:]:
        print(f"   {how:36s} -> {symbols}")
    assert steps[-1][1] == tok.tokenize(word), "the loop above must agree with the tokenizer"
print("final tokens of the whole prompt:", tok.tokenize(prompt))

# %% [markdown]
# Common words end as one token (`handwritten</w>` took 8 merges); rarer words stay split into pieces that are
# themselves common. **5. Ids.** Each final symbol is a vocabulary entry; the model input is
# `[<|startoftext|>] + ids[:75] + [<|endoftext|>]`, padded to 77 with `<|endoftext|>` (49407) for SD 1.x:

# %%
ids = tok(prompt)[0]  # (77,) int64
n = int(np.argmax(ids == 49407)) + 1  # up to and including the first <|endoftext|>
print([(int(i), tok.id_to_token(int(i))) for i in ids[:n]], f"... and {77 - n} x 49407 padding")

# %% [markdown]
# ## The causal text transformer
#
# The text encoder is a stack of pre-LayerNorm transformer blocks, like GPT-2: token embedding + learned position
# embedding, then per layer self-attention and an MLP, then a final LayerNorm. Its self-attention is **causal**
# (token $i$ attends only to tokens $j \le i$, the mask of `attention_forward(..., causal=True)`). CLIP used a causal
# mask for its contrastive objective, which reads the state at the end-of-text token, and SD keeps the same model
# but uses **all 77** final states as the U-Net's context.
#
# The default model's text encoder is a 2-layer, 64-wide version of SD 1.5's 12-layer, 768-wide CLIP-L,
# trained on MNIST captions by minisd. Causality is easy to see: change the last word and every state
# before it stays bit-identical.

# %%
%%needs_model
enc = model.text_encoder
print(enc.config)
trace = []
seven, _ = enc.forward(tok("a handwritten seven"), trace=lambda name, a: trace.append((name, a.shape)))
three, _ = enc.forward(tok("a handwritten three"))  # (1, 77, D) each
print("trace:", trace)
same = [bool(np.array_equal(seven[0, i], three[0, i])) for i in range(6)]
print("positions 0-5 (<sot>, a, handwritten, seven/three, <eot>, pad) identical in both prompts:", same)

# %% [markdown]
# Positions 0-2 (`<|startoftext|>`, "a", "handwritten") do not know about the last word; from position 3 on
# everything differs, including the padding, which attends to the whole prompt. That is why SD's padding positions
# carry prompt information, and why the U-Net gets all 77 states, not just the prompt's own tokens.
#
# ## Cross-attention maps: where each word is read
#
# In every U-Net transformer block, `attn2` computes for each image location $i$ (a query) a softmax over the 77
# text tokens $j$ (keys): $P_{ij}$ is how much location $i$ reads from token $j$. We sample an image with DDIM and
# classifier-free guidance, keep each U-Net call's cache (`keep_cache=True`), and rebuild the cross-attention
# probabilities of the conditional half from it: `AttentionCache` stores the scaled queries, the keys and each
# query row's log-sum-exp, so $P = \exp(q k^\top - \mathrm{lse})$, exactly how `attention_backward` rebuilds them.
# Averaged over heads, layers and steps, and upsampled from the latent grid to the image, each token gets a map.

# %%
%%needs_model
prompt = "a handwritten seven"
tokens = ["<sot>"] + [t.replace("</w>", "") for t in tok.tokenize(prompt)] + ["<eot>"]
n_tok = len(tokens)  # the prompt's own positions; positions n_tok .. 76 are padding
context, _ = enc.forward(tok(["", prompt]))  # (2, 77, D): unconditional, conditional
sampler = make_sampler("ddim", model.scheduler)
sampler.set_timesteps(25)
rng = np.random.default_rng(7)
lat = rng.standard_normal((1, model.unet.config.in_channels, model.sample_size, model.sample_size), dtype=np.float32)
lat = lat * np.float32(sampler.init_noise_sigma)
layers = [layer for block in model.unet.plan.input_blocks for layer in block] + list(model.unet.plan.middle) + \
         [layer for block in model.unet.plan.output_blocks for layer in block]  # the order of cache.layers
side = model.vae_scale_factor * model.sample_size  # image side
maps = np.zeros((n_tok + 1, side, side))  # one map per prompt position, plus all padding positions together
n_maps = 0  # maps accumulated; each one's 77 token probabilities sum to 1 at every location
for t in sampler.timesteps:
    out, cache = model.unet.forward(np.concatenate([lat, lat]), t, context, keep_cache=True)
    for layer, c in zip(layers, cache.layers):
        if layer.kind != "st":
            continue
        H = c[4][2]  # the transformer's (N, C, H, W)
        for block_cache in c[2]:
            a = block_cache[3][3]  # attn2's AttentionCache: q, k (N * heads, tokens, d), lse (N * heads, L)
            h = a.num_heads
            p = np.exp(a.q[h:] @ a.k[h:].transpose(0, 2, 1) - a.lse[h:, :, None])  # (heads, HW, 77): cond half
            p = p.mean(axis=0).T  # (77, HW), averaged over heads
            p = np.concatenate([p[:n_tok], p[n_tok:].sum(axis=0, keepdims=True)]).reshape(n_tok + 1, H, H)
            maps += np.kron(p, np.ones((side // H, side // H)))  # nearest upsampling to the image grid
            n_maps += 1
    lat = sampler.step(guide(out, 3.0, 0.0), t, lat)
image = np.clip(decode(model, lat)[0], -1, 1)  # (3, side, side)

names = tokens + [f"padding ({77 - n_tok} pos.)"]
fig, axes = plt.subplots(1, len(names) + 1, figsize=(1.9 * (len(names) + 1), 2.4))
axes[0].imshow((image[0] + 1) / 2, cmap="gray", vmin=0, vmax=1)
axes[0].set_title(repr(prompt), fontsize=8)
for ax, name, m in zip(axes[1:], names, maps):
    ax.imshow((image[0] + 1) / 2, cmap="gray", vmin=0, vmax=1)
    ax.imshow(m, cmap="jet", alpha=0.5)  # each map on its own colour scale: where, not how much
    ax.set_title(f"{name}\n{m.mean() / n_maps:.0%} of attention", fontsize=8)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Each map is drawn on its own colour scale (where a token is read); the percentage is its share of all the
# attention (how much). This small model reads the prompt mostly from the **padding** positions: after the causal
# encoder they hold a summary of the whole prompt (previous section), so attending to them is as good as attending
# to the words, and spread over many positions; the word positions themselves get a few percent each. (At this
# model's 8x8 and 4x4 latent grids the maps are necessarily coarse.) In SD 1.5 the same construction, at 64x64 and
# 32x32, gives maps in which each content word lights up over the object it names (Hertz et al. 2022,
# Prompt-to-Prompt, https://arxiv.org/abs/2208.01626, which edits images by editing these maps).
#
# ## Summary
#
# * Tokenizer: cleanup -> pre-tokens -> bytes -> greedy BPE merges -> ids, padded to 77 (`CLIPTokenizer`).
# * Text encoder: a causal transformer; the U-Net receives all 77 final states.
# * Cross-attention: image locations (queries) read the text states (keys/values); the maps show where.
# * **Next:** [notebook 7](07_sampling.ipynb), the samplers.

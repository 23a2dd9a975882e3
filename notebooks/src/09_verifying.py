# Source of notebooks/09_verifying.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 9. Verifying: is minisd computing the same thing as diffusers?
#
# Every op in minisd is tested against PyTorch and against central differences, and every model against
# diffusers/transformers with the same weights (`tests/`). `minisd verify` does the same for **a checkpoint you
# give it**: it runs the text encoder, the U-Net and the VAE in minisd and in diffusers on identical inputs, records
# the output of every block on both sides, and reports the relative error block by block, then compares a short
# sampling run end to end. When something is wrong (a bad conversion, a wrong config, a bug) the first block whose
# error jumps is where to look.
#
# It needs the reference libraries (`pip install torch==2.13.0 diffusers transformers`, the `reference` extra);
# without them it runs minisd's side only. About a minute here, on the default tiny model (`MINISD_MODEL` picks
# another; any SD 1.x/2.x single file, diffusers folder or minisd file works, e.g. `--ckpt v1-5.safetensors`).

# %%
import os

import numpy as np
import matplotlib.pyplot as plt

from minisd.cli import main as minisd_cli  # the `minisd` command, callable from Python
from minisd.verify import (compare, have_reference, load_reference, make_inputs, report, run_minisd,
                           run_reference)
from nbutil import load_default_model, model_path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notices about optional image backends
model = load_default_model()
print("reference libraries (torch, diffusers, transformers) installed:", have_reference())

# %% [markdown]
# ## Run it
#
# This is exactly the command line `minisd verify --ckpt PATH --steps 2`, called in-process:

# %%
%%needs_model
status = minisd_cli(["verify", "--ckpt", str(model_path()), "--steps", "2"])
print("exit status:", status, "(0 = agree, 1 = divergence, 2 = user error)")

# %% [markdown]
# ## Reading the report
#
# * **What is compared.** The text encoder on the token ids of `["", prompt]`; the U-Net on one sampling step's
#   input (seeded latents, duplicated for guidance, the first DDIM timestep, *minisd's* text embeddings, so an error in
#   the text encoder cannot leak into the U-Net's numbers); the VAE decoder on those latents; the encoder on the
#   decoded image. The diffusers side is built from the same file by diffusers' own single-file converters.
# * **Block names** are minisd's trace points (`input_blocks.4`, `decoder.up.2`, ...); the diffusers side hooks the
#   modules that compute the same tensors (`minisd/verify.py`, `_unet_modules`).
# * **`rel_error`** is $\max|a - b| / \max|b|$ (`minisd.testing.rel_error`): one number per block that does not blow up
#   where values cross zero. float32 arithmetic done in a different order (different BLAS, Winograd vs direct
#   convolution, blocked attention) gives $10^{-7}$-$10^{-5}$, growing slowly with depth. A wrong weight, a
#   swapped half, a wrong epsilon give $10^{-3}$ to $1$. The default tolerance, $10^{-3}$, sits in the gap.
# * **End to end**: two DDIM steps with guidance through each library's own pipeline from the same latents: the
#   final latents and the 8-bit image (max pixel difference out of 255).
#
# Plotting the per-block errors shows how float32 noise accumulates through the network (blocks that match
# exactly, such as the embedding lookup, are drawn at $10^{-9}$):

# %%
%%needs_model
inputs = make_inputs(model, "a handwritten seven", seed=0, height=32, width=32, steps=0)
ours = run_minisd(model, inputs)
theirs = run_reference(load_reference(model_path(), model), model, inputs, ours) if have_reference() else None
if theirs is not None:
    table, first = compare(ours, theirs)
    fig, axes = plt.subplots(1, len(table), figsize=(14, 3.2), sharey=True)
    for ax, (component, rows) in zip(axes, table.items()):
        ax.semilogy([max(r[2], 1e-9) for r in rows], "o-")  # an exact match (0) is drawn at 1e-9
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=90, fontsize=7)
        ax.axhline(1e-3, color="red", ls="--", lw=0.8)
        ax.set_title(component, fontsize=9)
    axes[0].set_ylabel("rel_error vs diffusers")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## What a divergence looks like
#
# To see the tool find a bug, break minisd's copy of the model the way a converter bug would and verify it against
# the untouched file: swap the two halves of one GEGLU projection (value first and gate second is easy to get
# backwards; notebook 4). The reference side still loads the correct weights from the file.

# %%
%%needs_model
from minisd.sdmodel import load_minisd
from minisd.verify import verify

broken = load_minisd(model_path())
name = next(k for k in broken.unet.params.keys() if k.endswith("ff.net.0.proj.weight") and ".output_blocks." in k)
w = broken.unet.params.data[name]
half = w.shape[0] // 2
broken.unet.params.data[name] = np.concatenate([w[half:], w[:half]])  # gate first, value second: the bug
print("swapped the halves of", name, "\n")
ok = verify(str(model_path()), prompt="a handwritten seven", steps=0, model=broken)

# %% [markdown]
# Every block before the broken layer still agrees to float32 precision, and the report names the first block
# whose error jumps, the output block that contains the swapped weight: the place to start reading code. The
# blocks after it diverge too (they inherit the error), which is why the *first* one is what the report names. The text encoder and the VAE, which do not contain the
# weight, still agree. That is the whole method of verification in minisd, at every scale: the same inputs on both
# sides, errors measured block by block, and a tolerance that separates rounding from bugs.
#
# ## Summary
#
# * `minisd verify --ckpt PATH` compares minisd with diffusers block by block on any SD checkpoint.
# * float32 agreement is $\sim 10^{-6}$; a real bug is orders of magnitude larger and is located by the first block
#   that exceeds the tolerance.
# * The op-level tests (`tests/test_ops_*.py`) and the derivations ([docs/](../docs/)) are the same idea, one op at a
#   time.

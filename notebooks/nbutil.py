"""Small helpers shared by the minisd notebooks: where the data is, loading it politely, and drawing images.

Nothing here computes anything about diffusion: every op, model, schedule and sampler the notebooks use comes from
minisd itself. This file only finds files and draws pictures, so that each notebook's cells stay short.

    from nbutil import load, show, show_grid         # in a notebook running from the notebooks/ folder
    mnist = load("mnist", "test")                    # a minisd.datasets.Split, or None with the how-to printed

Data location, first that exists: $MINISD_DATA, then ../shared/data next to the repository (the project's shared
copy), then minisd's default ~/.cache/minisd/data (what `minisd download mnist` fills). When a dataset is missing
the loader's UserError (which says what to run) is printed instead of a traceback, `load` returns None, and every
later cell that starts with `%%needs_data` is skipped with a one-line note. The same for the model
(`%%needs_model`): the default one ships inside the package (minisd/data/default_model.safetensors); set
$MINISD_MODEL to use another minisd model file (e.g. your own mnist_ldm export).
Importing this module registers those two cell magics, sets matplotlib's figure dpi to FIGURE_DPI and silences
tqdm's "IProgress not found" warning (progress bars are off in the notebooks).
"""
import os
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent  # the minisd checkout this notebooks/ folder belongs to
_missing = {"data": [], "model": []}  # what could not be loaded, by kind (the magics below read it)
FIGURE_DPI = 72  # inline figures: small PNGs keep the committed notebooks light


def data_dir():
    """The data directory the notebooks use: $MINISD_DATA, else ../shared/data next to the repo, else the
    default of minisd.datasets (~/.cache/minisd/data)."""
    from minisd.datasets import resolve_data_dir
    if os.environ.get("MINISD_DATA"):
        return resolve_data_dir(os.environ["MINISD_DATA"])
    shared = REPO.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return resolve_data_dir(None)


def load(name, split="test"):
    """minisd.datasets.load_dataset(name, split) from data_dir(); on a UserError print its message and return None."""
    from minisd.datasets import load_dataset
    from minisd.errors import UserError
    _set_missing("data", name, False)  # a re-run after `minisd download` must un-skip the cells
    try:
        return load_dataset(name, split, data_dir=data_dir())
    except UserError as e:
        print(f"{name} is not available, so the cells that need it will be skipped.\n\n{e}")
        _set_missing("data", name, True)
        return None


def _set_missing(kind, what, missing):
    if what in _missing[kind]:
        _missing[kind].remove(what)
    if missing:
        _missing[kind].append(what)


def model_path():
    """The model the notebooks use: $MINISD_MODEL if set (e.g. your own mnist_ldm export), else the default model
    inside the installed package, minisd/data/default_model.safetensors."""
    if os.environ.get("MINISD_MODEL"):
        return Path(os.environ["MINISD_MODEL"]).expanduser()
    import minisd
    return Path(minisd.__file__).resolve().parent / "data" / "default_model.safetensors"


def load_default_model():
    """The tiny text-conditioned MNIST Stable Diffusion that ships with minisd (or $MINISD_MODEL), or None with a
    note saying what is missing."""
    from minisd.errors import UserError
    from minisd.sdmodel import load_minisd
    path = model_path()
    _missing["model"].clear()  # one model per notebook: a re-run decides afresh
    if not path.is_file():
        print(f"The model file {path} does not exist, so the cells that need it will be skipped. The default model "
              f"ships inside minisd (minisd/data/default_model.safetensors); to use your own, train it as "
              f"docs/training.md describes (mnist_vae, mnist_clip, mnist_ldm) and set MINISD_MODEL to its "
              f"model.safetensors.")
        _set_missing("model", str(path), True)
        return None
    try:
        return load_minisd(path)
    except UserError as e:
        print(f"{e}\nThe cells that need the model will be skipped.")
        _set_missing("model", str(path), True)
        return None


def have(kind="data"):
    """True when everything of this kind ("data" or "model") that a notebook asked for was loaded."""
    return not _missing[kind]


# ----------------------------------------------------------------------------------------------------------------
# drawing

def _as_hwc(img):
    """(C, H, W) float in [-1, 1] or uint8 -> (H, W) or (H, W, 3) float in [0, 1] for imshow."""
    a = np.asarray(img)
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else (a.astype(np.float32) + 1.0) / 2.0
    a = np.clip(a, 0.0, 1.0)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)  # (H, W) or (H, W, 3)
    return a


def show(images, titles=None, cols=None, size=1.6, suptitle=None, cmap="gray"):
    """Draw images (N, C, H, W) (floats in [-1, 1] or uint8) side by side, with optional titles."""
    import matplotlib.pyplot as plt
    images = list(images)
    n = len(images)
    cols = cols or n
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.3 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_as_hwc(images[i]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    plt.show()


def show_grid(images, cols, row_labels=None, title=None, scale=1.0):
    """A dense grid of many images (N, C, H, W) in [-1, 1] (minisd.train.plots.image_grid), shown as one figure."""
    import matplotlib.pyplot as plt
    from minisd.train.plots import image_grid
    grid = image_grid(np.asarray(images, dtype=np.float32), cols, row_labels=row_labels)
    h, w = grid.shape[:2]
    # scale 1: one grid pixel per screen pixel
    plt.figure(figsize=(scale * w / FIGURE_DPI, scale * h / FIGURE_DPI + (0.3 if title else 0)))
    plt.imshow(grid, interpolation="nearest")
    plt.axis("off")
    if title:
        plt.title(title, fontsize=10)
    plt.show()


# ----------------------------------------------------------------------------------------------------------------
# %%needs_data / %%needs_model: skip a cell when what it needs is missing

def _register_magics():
    try:
        from IPython import get_ipython
        from IPython.core.magic import register_cell_magic
    except ImportError:
        return
    if get_ipython() is None:
        return

    def _run_or_skip(kind, cell):
        if _missing[kind]:
            what = ", ".join(_missing[kind])
            print(f"(skipped: needs {what}; see the message above)")
            return
        # run the cell as if the magic line were not there; errors propagate so a failing cell still fails
        result = get_ipython().run_cell(cell)
        if not result.success:
            raise RuntimeError("the cell above failed (traceback printed above)") from None

    @register_cell_magic
    def needs_data(line, cell):
        """%%needs_data: run the cell only if every dataset this notebook loaded is available."""
        _run_or_skip("data", cell)

    @register_cell_magic
    def needs_model(line, cell):
        """%%needs_model: run the cell only if the default model was loaded."""
        _run_or_skip("model", cell)


def _setup_display():
    # tqdm.auto (minisd's pipeline, diffusers) warns in every notebook that lacks ipywidgets; the bars are off anyway
    warnings.filterwarnings("ignore", message="IProgress not found")
    try:
        import matplotlib
    except ImportError:  # the drawing helpers say so when called; loading data works without matplotlib
        return
    matplotlib.rcParams["figure.dpi"] = FIGURE_DPI


_register_magics()
_setup_display()

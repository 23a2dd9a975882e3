"""Build the notebooks from their readable sources, and run them so they are committed with their outputs.

    python notebooks/_build.py                    # src/*.py -> *.ipynb (sources only; existing outputs are dropped)
    python notebooks/_build.py --execute          # ... and run every notebook top to bottom, saving the outputs
    python notebooks/_build.py --execute 03       # only the notebooks whose name starts with 03
    python notebooks/_build.py --check            # exit 1 if a committed .ipynb differs from its source

Sources: notebooks/src/NN_name.py in the "percent" format (the one jupytext and VS Code read): a line
`# %% [markdown]` starts a markdown cell whose lines are comments ("# text"), a line `# %%` starts a code cell.
Edit the .py, never the .ipynb: the .py diffs cleanly and the .ipynb is regenerated from it.

Running: with nbclient (what tests/test_notebooks.py uses too), in the notebooks/ folder, on the current Python's
kernel. MINISD_DATA is set to ../shared/data next to the repository when that folder exists and MINISD_DATA is
not already set, exactly as the test does, so the committed outputs are the ones CI reproduces.
Cell ids are derived from the notebook name and the cell index, and nbclient's timing metadata is not recorded,
so rebuilding an unchanged notebook gives an identical file.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
REPO = HERE.parent
CELL_TIMEOUT_S = 600  # one cell (the training loop of notebook 3 is the longest)


def sources():
    """Every notebook source, sorted: [Path(notebooks/src/01_forward_diffusion.py), ...]."""
    return sorted(SRC.glob("[0-9][0-9]_*.py"))


def ipynb_path(src):
    return HERE / (src.stem + ".ipynb")


def parse_percent(text):
    """Percent-format text -> [(kind, source)], kind "markdown" or "code". Text before the first marker is ignored
    (the file's own docstring-comment)."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = lines[:]
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        if kind == "markdown":
            body = [ln[2:] if ln.startswith("# ") else ln[1:] if ln.startswith("#") else ln for ln in body]
        cells.append((kind, "\n".join(body)))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(src):
    """The notebook (no outputs) for one source file."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(parse_percent(src.read_text(encoding="utf-8"))):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        cell.id = f"{src.stem[:2]}-{i:03d}"  # stable ids: rebuilding an unchanged notebook changes nothing
        nb.cells.append(cell)
    return nb


def image_counts(nb):
    """Number of image outputs (png/svg/jpeg) per code cell, in cell order: what the test compares."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        out.append(sum(1 for o in cell.get("outputs", [])
                       if any(k.startswith("image/") for k in o.get("data", {}))))
    return out


def notebook_env():
    """Environment variables for a notebook run: MINISD_DATA -> ../shared/data when present and not set."""
    env = {}
    shared = REPO.parent / "shared" / "data"
    if not os.environ.get("MINISD_DATA") and shared.is_dir():
        env["MINISD_DATA"] = str(shared)
    return env


def execute(nb, timeout=CELL_TIMEOUT_S):
    """Run nb in place in the notebooks/ folder with nbclient; raises nbclient's CellExecutionError on failure."""
    from nbclient import NotebookClient
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    old = {k: os.environ.get(k) for k in notebook_env()}
    os.environ.update(notebook_env())
    try:
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def same_sources(a, b):
    """True when two notebooks have the same cells (kind and source), ignoring outputs."""
    return [(c.cell_type, c.source) for c in a.cells] == [(c.cell_type, c.source) for c in b.cells]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="notebook name prefixes (e.g. 03); default: all")
    ap.add_argument("--execute", action="store_true", help="run each notebook and save it with its outputs")
    ap.add_argument("--check", action="store_true", help="fail if a committed .ipynb differs from its source")
    args = ap.parse_args(argv)
    srcs = [s for s in sources() if not args.only or any(s.stem.startswith(p) for p in args.only)]
    if args.check:
        stale = [s.stem for s in srcs
                 if not ipynb_path(s).is_file() or not same_sources(build(s), nbformat.read(ipynb_path(s), 4))]
        if stale:
            print(f"stale notebooks (run python notebooks/_build.py --execute {' '.join(stale)}): {stale}")
            return 1
        print(f"{len(srcs)} notebooks match their sources")
        return 0
    total = 0.0
    for src in srcs:
        nb = build(src)
        if args.execute:
            t0 = time.perf_counter()
            execute(nb)
            dt = time.perf_counter() - t0
            total += dt
            print(f"{src.stem}: ran in {dt:.0f} s, images per code cell {image_counts(nb)}", flush=True)
        nbformat.write(nb, ipynb_path(src))
    if args.execute:
        print(f"total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

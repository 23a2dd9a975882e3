"""What `pip install .` puts on a user's machine: every module, the shipped data and the CUDA sources, and nothing
that shadows another project's package.

Why these tests exist: an editable install or a run from the repository root imports from the source tree, so a
package folder without __init__.py (a namespace package there) or a data file that setup.py does not ship passes
every other test and still breaks `pip install . && minisd txt2img` on a fresh machine. A top-level package named
`kernels` once shadowed Hugging Face's `kernels`, which transformers imports.
"""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_source_folder_is_a_package():
    for top in ("minisd", "weights_convert"):
        for d in sorted((REPO / top).rglob("*")):
            if d.is_dir() and "__pycache__" not in d.parts and any(d.glob("*.py")):
                assert (d / "__init__.py").is_file(), f"{d.relative_to(REPO)} has modules but no __init__.py"


def test_kernels_folder_is_not_an_importable_package():
    assert not (REPO / "kernels" / "__init__.py").exists(), \
        "kernels/ must stay a folder of sources: a top-level package `kernels` shadows Hugging Face's"


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("minisd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"minisd", "weights_convert"}, tops
    modules = {str(p.relative_to(REPO)) for top in ("minisd", "weights_convert")
               for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)[:5]
    for data in ("minisd/data/bpe_simple_vocab_16e6.txt.gz", "minisd/data/default_model.safetensors"):
        assert data in names
    kernels = {f"minisd/cuda/kernels/{p.relative_to(REPO / 'kernels')}" for p in (REPO / "kernels").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert kernels <= names, sorted(kernels - names)[:5]


def _timeout_after(code, env_value=None):
    """OPENBLAS_THREAD_TIMEOUT as seen after running `code` in a fresh interpreter."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if env_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_value
    r = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_import_shortens_openblas_spin_only_when_it_can():
    # before numpy: set, so OpenBLAS reads it when numpy loads it (minisd/__init__.py says why)
    assert _timeout_after("import minisd, numpy") == "12"
    # the user's own value wins
    assert _timeout_after("import minisd", env_value="20") == "20"
    # numpy already loaded: OpenBLAS has read its settings, so minisd does not pretend to change them
    assert _timeout_after("import numpy, minisd") == "None"

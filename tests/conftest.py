"""pytest configuration shared by every test.

Markers: `slow` (full-size SD architectures; CI runs them, `-m "not slow"` skips them locally),
`gpu` (needs a real CUDA device; skipped automatically when none is present).
Tests that need torch/diffusers/transformers call pytest.importorskip, so they skip cleanly without them.
Tests that need ../shared use the `shared_dir` fixture, which skips with a reason when it is absent.
"""
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MINISD_SHARED", REPO.parent / "shared"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size architectures or long runs (run in CI)")
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU with CuPy")


def _have_gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _have_gpu():
        skip = pytest.mark.skip(reason="no CUDA GPU/CuPy on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: tests never depend on each other's random draws."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shared_dir():
    """../shared (data, references). Skips the test with a reason when it is not there."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared data folder at {SHARED} (set MINISD_SHARED to point elsewhere)")
    return SHARED

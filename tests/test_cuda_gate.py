"""The NVRTC compile gate (kernels/gate.py): passes on every kernel for sm_80 and sm_90, and fails where it must
(local memory, a regressed or stale resource baseline, convention breaks, NVRTC-only compile errors).

Needs CuPy's NVRTC binding (pip install cupy-cuda13x nvidia-cuda-nvrtc); no GPU and no driver.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minisd.cuda import sources as kernels
from minisd.cuda import gate
from minisd.cuda.sources import KERNEL_DIR

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nvrtc_ok():
    try:
        gate.nvrtc_version()  # imports cupy.cuda.nvrtc and asks the library for its version
    except Exception as e:
        pytest.skip(f"the compile gate needs NVRTC: pip install cupy-cuda13x nvidia-cuda-nvrtc ({e})")


def test_gate_passes_for_every_kernel(nvrtc_ok):
    ok, rows, errors, measured = gate.check()
    assert ok, "\n".join(errors)
    files = {p.name for p in kernels.sources()}
    assert {"groupnorm.cu", "layernorm.cu", "softmax.cu", "geglu.cu"} <= files
    for arch in ("sm_80", "sm_90"):
        assert set(measured[arch]) == files
        for fname in files:  # every kernel of every file was compiled and reported by ptxas
            assert set(measured[arch][fname]) == set(kernels.find_kernels((KERNEL_DIR / fname).read_text()))
    for r in rows:
        assert r.res["stack"] == r.res["spill_stores"] == r.res["spill_loads"] == 0, r
        assert 0 < r.res["regs"] <= 255


def test_gate_command_line(nvrtc_ok):
    r = subprocess.run([sys.executable, "-m", "minisd.cuda.gate"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"gate passed: {len(kernels.sources())} files" in r.stdout
    assert "groupnorm_forward_v2" in r.stdout and "sm_80" in r.stdout and "sm_90" in r.stdout


def test_gate_refuses_local_memory(nvrtc_ok):
    ok, rows, errors, _ = gate.check([KERNEL_DIR / "bugs" / "local_memory.cu"], baseline=None)
    assert not ok
    assert any("gather_local_v1 (sm_90): uses local memory (256 bytes stack frame" in e for e in errors), errors
    assert any("ptxas warning : Local memory used" in e for e in errors), errors


def _edited_baseline(tmp_path, edit):
    data = json.loads(gate.BASELINE.read_text())
    edit(data)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(data))
    return path


def test_gate_refuses_a_register_or_smem_regression(nvrtc_ok, tmp_path):
    def tighten(data):
        data["sm_90"]["groupnorm.cu"]["groupnorm_forward_v2"]["regs"] -= 1
        data["sm_80"]["layernorm.cu"]["layernorm_backward_dparams_v2"]["smem"] -= 4
    path = _edited_baseline(tmp_path, tighten)
    ok, _, errors, _ = gate.check([KERNEL_DIR / "groupnorm.cu", KERNEL_DIR / "layernorm.cu"], baseline=path)
    assert not ok
    assert any(e.startswith("groupnorm.cu groupnorm_forward_v2 (sm_90): regressed") for e in errors), errors
    assert any(e.startswith("layernorm.cu layernorm_backward_dparams_v2 (sm_80): regressed") for e in errors), errors
    assert len([e for e in errors if "regressed" in e]) == 2


def test_gate_reports_improvements_and_stale_entries(nvrtc_ok, tmp_path):
    def loosen(data):
        data["sm_90"]["softmax.cu"]["softmax_forward_v3"]["regs"] += 8  # the code now uses fewer: fine
    ok, rows, errors, _ = gate.check([KERNEL_DIR / "softmax.cu"], baseline=_edited_baseline(tmp_path, loosen))
    assert ok, errors
    assert [r.status for r in rows if r.kernel == "softmax_forward_v3" and r.arch == "sm_90"] == ["better"]

    def stale(data):
        del data["sm_90"]["softmax.cu"]["softmax_backward_v1"]
        data["sm_80"]["softmax.cu"]["softmax_forward_v9"] = {"regs": 10, "smem": 0}
    ok, _, errors, _ = gate.check([KERNEL_DIR / "softmax.cu"], baseline=_edited_baseline(tmp_path, stale))
    assert not ok
    assert any("softmax_backward_v1 (sm_90): not in the baseline" in e for e in errors), errors
    assert any("softmax_forward_v9 (sm_80): in the baseline but not in the source" in e for e in errors), errors


def test_update_baseline(nvrtc_ok, tmp_path):
    path = tmp_path / "baseline.json"
    assert gate.main(["--update-baseline", "--baseline", str(path), str(KERNEL_DIR / "geglu.cu")]) == 0
    data = json.loads(path.read_text())
    assert set(data["sm_80"]) == set(data["sm_90"]) == {"geglu.cu"}
    assert data["sm_90"]["geglu.cu"] == json.loads(gate.BASELINE.read_text())["sm_90"]["geglu.cu"]
    assert gate.main(["--baseline", str(path), str(KERNEL_DIR / "geglu.cu")]) == 0
    # updating one more file keeps the first one's entries
    assert gate.main(["--update-baseline", "--baseline", str(path), str(KERNEL_DIR / "softmax.cu")]) == 0
    assert set(json.loads(path.read_text())["sm_90"]) == {"geglu.cu", "softmax.cu"}


def test_fixtures_and_selftest_compile_with_nvrtc(nvrtc_ok):
    """kernels/bugs/*.cu are wrong on purpose but must be valid CUDA; selftest.cu runs on real GPUs too."""
    paths = sorted((KERNEL_DIR / "bugs").glob("*.cu")) + [KERNEL_DIR / "emu" / "selftest.cu"]
    assert len(paths) >= 5
    for p in paths:
        for arch in gate.ARCHS:
            cubin, _ = gate.compile_cubin(p.read_text(), arch, p.name)
            assert len(cubin) > 0


def test_nvrtc_catches_what_host_headers_hide(nvrtc_ok):
    """NVRTC has no host math headers: INFINITY is undefined there (nvcc and g++ would accept this kernel)."""
    code = 'extern "C" __global__ void k_v1(float* y) { y[0] = -INFINITY; }\n'
    with pytest.raises(gate.GateError, match=r'identifier "INFINITY" is undefined'):
        gate.compile_cubin(code, "90", "inf.cu")


def test_conventions_are_linted():
    good = (KERNEL_DIR / "softmax.cu").read_text()
    assert gate.lint(good, "softmax.cu") == []
    assert any("#include" in p for p in gate.lint("#include <cmath>\n" + good, "x.cu"))
    assert any('must be declared extern "C"' in p for p in gate.lint("// Version history\n__global__ void k_v1() {}",
                                                                     "x.cu"))
    assert any("Version history" in p for p in gate.lint('extern "C" __global__ void k_v1() {}', "x.cu"))
    assert any("must carry its version number" in p
               for p in gate.lint('// Version history: v1\nextern "C" __global__ void k() {}', "x.cu"))
    # comments do not count: a commented-out #include or kernel is fine
    assert gate.lint('// Version history\n// #include <x>\n// __global__ void k() {}\n'
                     'extern "C" __global__ void k_v1() {}', "x.cu") == []


def test_baseline_names_its_nvrtc():
    """The baseline records the NVRTC it was measured with: register counts can change with the compiler, and the
    gate says so when the versions differ."""
    data = json.loads(gate.BASELINE.read_text())
    assert set(data) >= {"nvrtc", "sm_80", "sm_90"}
    assert set(data["sm_90"]) == {p.name for p in kernels.sources()}

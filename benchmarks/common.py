"""Honest timing and memory measurement for the minisd-vs-PyTorch benchmarks (ops.py, models.py, pipeline.py).

Rules these helpers enforce (DEVELOPERS.md, "Speed and memory live in benchmarks/"):
  * both libraries get the same number of threads: BLAS/OpenMP via environment variables, which only work if set
    *before* numpy/torch are imported (so import this module first), torch.set_num_threads, and minisd's own
    elementwise pool via MINISD_NUM_THREADS. Default 2 (the CI machines have 2 cores); override with
    BENCH_THREADS=n in the environment.
  * times are the best of several repeats after warm-up, and minisd and torch are timed interleaved in the same
    process (`best_times`), so load from other processes hits both alike. Report ratios, not absolute seconds.
  * peak memory is measured for one case at a time in a fresh process (`run_isolated`): the case's module is
    imported, the baseline is taken, then the case builds its inputs and runs; peak - baseline is what the case
    itself needed (weights + inputs + working memory), not what the libraries cost to import.

Why VmHWM and not resource.getrusage().ru_maxrss: on Linux, a child started with fork+exec (subprocess,
multiprocessing "spawn") inherits its parent's ru_maxrss (the kernel carries the old address space's high-water
mark across exec). Measured on the dev machine: parent at 1552 MiB, fresh child reported ru_maxrss 1552 MiB and
VmHWM 10.6 MiB. So the child reads the high-water mark of its own address space from /proc/self/status (VmHWM),
after resetting it to the current RSS at the baseline (writing "5" to /proc/self/clear_refs, Linux >= 4.0).
Where /proc is missing (macOS), ru_maxrss is used and the baseline still subtracts the import cost.

Use:
    from common import best_time, best_times, run_isolated, print_table     # run as python benchmarks/x.py

    def conv_minisd(N=2, C=64):            # a "case": setup, then return the zero-argument function to time
        x = ...; w = ...
        return lambda: conv2d_forward(x, w, None, 1, 1)

    r = run_isolated(conv_minisd, N=2, C=64)   # -> Isolated(time_s, peak_mib, baseline_mib, setup_mib); r.net_mib
"""
import os

BENCH_THREADS = int(os.environ.get("BENCH_THREADS", "2"))
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINISD_NUM_THREADS")
for _v in _THREAD_VARS:  # must happen before numpy/torch are imported to take effect
    os.environ.setdefault(_v, str(BENCH_THREADS))
# torch's OpenMP workers busy-wait after every parallel region (libgomp's default spin), and on a 2-core machine
# that spinning takes the cores away from whatever runs next: in an interleaved timing, minisd's call. Measured
# for LayerNorm (2, 4096, 320): minisd 2.1 ms alone, 3.2-3.7 ms right after a torch call; with passive waiting
# 2.3-2.6 ms, while torch's own time stayed the same (0.68 vs 0.70 ms). So workers sleep when idle; set
# OMP_WAIT_POLICY=ACTIVE in the environment to see the other behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# NumPy's OpenBLAS workers spin the same way (~0.1 s after each matmul). `import minisd` shortens that by itself
# when it comes before numpy (minisd/__init__.py says why and what it measured); these scripts import numpy
# first, so they set the same value here. It touches only NumPy's BLAS, not torch's.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

import importlib  # noqa: E402  (after the environment is set, on purpose)
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_MARK = "@@bench-result@@ "  # prefix of the one stdout line that carries the child's result


def set_torch_threads(n=BENCH_THREADS):
    """torch.set_num_threads(n) if torch has been imported (we never import it here ourselves)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# timing

def best_time(fn, repeat=5, warmup=1):
    """Best wall-clock seconds of `repeat` calls of fn() after `warmup` untimed calls. The minimum, not the
    mean: noise from other processes only ever adds time."""
    set_torch_threads()
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_times(fns, repeat=5, warmup=1):
    """{name: fn} -> {name: best seconds}, timed *interleaved* (round-robin: a, b, a, b, ...) so a burst of load
    from another process hits every contender, not just the one that happened to be running."""
    set_torch_threads()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------------------------------------------
# memory: one case in a fresh process

class Isolated(NamedTuple):
    time_s: float  # best time of the case's function (best_time with the given repeat/warmup)
    peak_mib: float  # high-water RSS of the child from the baseline on (VmHWM; ru_maxrss without /proc)
    baseline_mib: float  # RSS after the imports, before the case's setup
    setup_mib: float  # RSS after the setup (weights, inputs), before the timed calls

    @property
    def net_mib(self):
        """Peak memory the case itself needed: peak - baseline."""
        return self.peak_mib - self.baseline_mib


def _status_mib(field):
    """VmRSS / VmHWM from /proc/self/status in MiB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # the kernel reports kB
    except OSError:
        pass
    return None


def _maxrss_mib():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux


def _reset_peak():
    """Make VmHWM restart from the current RSS (Linux >= 4.0). Returns False if that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _case_spec(case):
    """A function -> "module:qualname" or "/path/file.py:qualname" the child can import; strings pass through."""
    if isinstance(case, str):
        return case
    mod = case.__module__
    if mod in ("__main__", "__mp_main__"):
        return f"{Path(inspect.getfile(case)).resolve()}:{case.__qualname__}"
    return f"{mod}:{case.__qualname__}"


def _load_case(spec):
    where, _, qualname = spec.rpartition(":")
    if where.endswith(".py"):
        # A script's own functions: import the file under another name so its `if __name__ == "__main__"` block
        # does not run again in the child.
        s = importlib.util.spec_from_file_location("_bench_case_module", where)
        module = importlib.util.module_from_spec(s)
        sys.modules[s.name] = module
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def run_isolated(case, repeat=3, warmup=1, imports=("numpy",), timeout=None, **kwargs):
    """Run one benchmark case in a fresh Python process and measure its time and peak memory.

    case: a module-level function (or "module:function" / "/path/file.py:function") that takes **kwargs, does
    its setup and returns the zero-argument function to time. imports: module names to import before the
    baseline (default numpy; add "torch" or "minisd" when the case's module imports them lazily), so import costs
    are not charged to the case (the case's own module is always imported before the baseline).
    kwargs must be JSON-serialisable. Returns Isolated(time_s, peak_mib, baseline_mib, setup_mib);
    .net_mib = peak - baseline.
    """
    payload = json.dumps({"case": _case_spec(case), "kwargs": kwargs, "repeat": repeat, "warmup": warmup,
                          "imports": list(imports)})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    for v in _THREAD_VARS:
        env[v] = str(BENCH_THREADS)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", payload], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark case {_case_spec(case)} failed in its subprocess (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return Isolated(**json.loads(lines[-1][len(_MARK):]))


def _child_main(payload):
    """The child side of run_isolated: imports, baseline, setup, timing, peak; one result line on stdout."""
    job = json.loads(payload)
    for name in job["imports"]:
        importlib.import_module(name)
    factory = _load_case(job["case"])
    set_torch_threads()
    have_proc = _reset_peak() and _status_mib("VmHWM") is not None
    baseline = _status_mib("VmRSS") if have_proc else _maxrss_mib()
    fn = factory(**job["kwargs"])
    setup = _status_mib("VmRSS") if have_proc else _maxrss_mib()
    t = best_time(fn, repeat=job["repeat"], warmup=job["warmup"])
    peak = _status_mib("VmHWM") if have_proc else _maxrss_mib()
    result = {"time_s": t, "peak_mib": peak, "baseline_mib": baseline, "setup_mib": setup}
    print(_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# reporting

def _fmt(v):
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.2e}"
    return str(v)


def ratio_pairs(columns):
    """Auto-detected (minisd column, torch column) pairs: "minisd ms" with "torch ms", "minisd MiB" with
    "torch MiB" (same text after the library name)."""
    pairs = []
    for c in columns:
        if c.startswith("minisd"):
            other = "torch" + c[len("minisd"):]
            if other in columns:
                pairs.append((c, other))
    return pairs


def print_table(rows, columns, ratios=None, file=None):
    """Print rows (dicts) as an aligned markdown table with one ratio column (minisd/torch) per pair.

    ratios: [(numerator column, denominator column)], default ratio_pairs(columns). A ratio column is named
    "ratio <rest>" (e.g. "ratio ms"); > 1 means minisd is slower / uses more. Missing values print as "-".
    Returns the table text.
    """
    ratios = ratio_pairs(columns) if ratios is None else list(ratios)
    header = list(columns)
    body = []
    for r in rows:
        cells = [_fmt(r.get(c, "-")) for c in columns]
        for num, den in ratios:
            a, b = r.get(num), r.get(den)
            cells.append(f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-")
        body.append(cells)
    for num, den in ratios:
        rest = num[len("minisd"):].strip() if num.startswith("minisd") else f"{num}/{den}"
        header.append(f"ratio {rest}".strip())
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [all(_is_number(b[i]) for b in body) and bool(body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if n else "-" * w for w, n in zip(widths, numeric)) + " |"
    text = "\n".join([line(header), sep] + [line(b) for b in body])
    print(text, file=file or sys.stdout)
    return text


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return s == "-"


# ----------------------------------------------------------------------------------------------------------------
# self-demo: python benchmarks/common.py

def demo_matmul_numpy(n=512):
    """A tiny case: two n x n float32 matrices, one matmul."""
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return lambda: a @ b


def demo_matmul_torch(n=512):
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: a @ b


def demo_big_temporary(mib=200):
    """Allocates (and frees) a `mib` MiB array per call: the peak must show it, the baseline must not."""
    import numpy as np
    return lambda: np.ones(mib * 2 ** 20 // 8).sum()


def _demo():
    n = 512
    rows = []
    import numpy as np
    have_torch = importlib.util.find_spec("torch") is not None
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    fns = {"minisd": lambda: a @ b}
    if have_torch:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: ta @ tb
    t = best_times(fns, repeat=5)
    row = {"case": f"matmul {n}", "minisd ms": 1e3 * t["minisd"]}
    m = run_isolated(demo_matmul_numpy, n=n)
    row["minisd MiB"] = m.net_mib
    if have_torch:
        row["torch ms"] = 1e3 * t["torch"]
        row["torch MiB"] = run_isolated(demo_matmul_torch, n=n, imports=("numpy", "torch")).net_mib
    rows.append(row)
    big = run_isolated(demo_big_temporary, mib=200, repeat=1, warmup=0)
    rows.append({"case": "200 MiB temporary", "minisd ms": 1e3 * big.time_s, "minisd MiB": big.net_mib})
    print(f"threads: {BENCH_THREADS}; 'minisd' here is plain NumPy (a demo of the harness, not of minisd)")
    print_table(rows, ["case", "minisd ms", "torch ms", "minisd MiB", "torch MiB"])
    print(f"200 MiB case: baseline {big.baseline_mib:.1f} MiB, after setup {big.setup_mib:.1f}, "
          f"peak {big.peak_mib:.1f} (net {big.net_mib:.1f})")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        _demo()

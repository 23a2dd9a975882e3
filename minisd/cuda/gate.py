"""NVRTC compile gate for minisd's CUDA kernels: no GPU and no driver needed.

    python -m minisd.cuda.gate                      # check every kernels/*.cu for sm_80 and sm_90
    python -m minisd.cuda.gate --update-baseline    # accept the current register / shared-memory usage
    python -m minisd.cuda.gate kernels/softmax.cu --arch 90

What it checks, per file and architecture (cubin, `-Xptxas=-v`, the options production uses):
  1. conventions: no #include, every __global__ kernel is extern "C", the file opens with a comment that has a
     "Version history", and every kernel name carries its version (`_v<N>`);
  2. NVRTC compiles it: errors *and* warnings fail (NVRTC is the compiler cupy.RawModule uses; it has caught code
     that nvcc accepts, e.g. INFINITY, which nvcc takes from host headers NVRTC does not have);
  3. no kernel uses local memory: a stack frame or spill stores/loads in ptxas' report fail (local memory is
     off-chip and ~100x slower than registers; in these kernels it always means an accident);
  4. no regression against kernels/resources_baseline.json: more registers (fewer resident warps) or more static
     shared memory than recorded fails; fewer is reported so the baseline can be tightened with
     --update-baseline. A kernel missing from the baseline (new) or a baseline entry without a kernel (removed)
     fails too, so the file always describes the code.

How: the thin binding cupy.cuda.nvrtc (createProgram / compileProgram / getProgramLog) works without a driver,
unlike cupy.RawModule and cupy.cuda.compiler, which ask the driver for the device's architecture. Needs
`pip install cupy-cuda13x nvidia-cuda-nvrtc`. Fixtures in kernels/bugs/ are not gated (they are broken on
purpose); tests/test_cuda_gate.py checks that they still compile.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

from .sources import KERNEL_DIR, NVRTC_OPTIONS, find_kernels, sources, strip_comments

BASELINE = KERNEL_DIR / "resources_baseline.json"
ARCHS = ("80", "90")  # A100 and H100: the GPUs minisd targets (the project's GPU machines are H100/H200)
# Options added for the gate only: the verbose ptxas report, and warnings for spills and local memory.
GATE_OPTIONS = ("-Xptxas=-v", "-Xptxas=-warn-spills", "-Xptxas=-warn-lmem-usage")


class GateError(RuntimeError):
    """NVRTC is missing or failed to compile."""


def nvrtc_module():
    try:
        from cupy.cuda import nvrtc  # the thin NVRTC binding; importing it does not touch the driver
    except ImportError as e:
        raise GateError(f"the compile gate needs NVRTC through CuPy: pip install cupy-cuda13x nvidia-cuda-nvrtc "
                        f"({e})") from None
    return nvrtc


def nvrtc_version():
    """NVRTC version as "major.minor" (e.g. "13.5")."""
    major, minor = nvrtc_module().getVersion()
    return f"{major}.{minor}"


def compile_cubin(code, arch, name="kernel.cu", options=()):
    """Compile CUDA C source to a cubin for sm_<arch> with NVRTC. Returns (cubin bytes, program log).

    Raises GateError with the compiler log on a compile error.
    """
    nvrtc = nvrtc_module()
    opts = [f"-arch=sm_{arch}", *NVRTC_OPTIONS, *options]
    prog = nvrtc.createProgram(code, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise GateError(f"{name} (sm_{arch}): NVRTC failed: {e}\n{nvrtc.getProgramLog(prog)}") from None
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def ptxas_resources(log):
    """Parse `-Xptxas=-v` output: {kernel: {"regs", "smem", "stack", "spill_stores", "spill_loads", "barriers"}}."""
    res, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            cur = res.setdefault(m.group(1), {"regs": 0, "smem": 0, "stack": 0, "spill_stores": 0,
                                              "spill_loads": 0, "barriers": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
        m = re.search(r"used (\d+) barriers", line)
        if m:
            cur["barriers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["smem"] = int(m.group(1))
    return res


def lint(code, name, production=True):
    """Convention problems of one .cu file, as a list of messages (empty = fine)."""
    problems = []
    bare = strip_comments(code)
    if re.search(r"^\s*#\s*include\b", bare, flags=re.M):
        problems.append(f"{name}: has an #include (kernels are single self-contained files: NVRTC has no "
                        f"system headers and the emulator force-includes its own)")
    try:
        kernels = find_kernels(code)
    except ValueError as e:
        return problems + [f"{name}: {e}"]
    if not kernels:
        problems.append(f'{name}: no extern "C" __global__ kernel')
    if production:
        header = code.split('extern "C"')[0]  # everything before the first kernel
        if not code.lstrip().startswith("//") or "Version history" not in header:
            problems.append(f"{name}: must open with a comment block (what it computes, shapes, the NumPy reference, "
                            f"a 'Version history')")
        for k in kernels:
            if not re.search(r"_v\d+$", k):
                problems.append(f"{name}: kernel {k!r} must carry its version number (e.g. {k}_v1)")
    return problems


class Row(NamedTuple):
    file: str
    arch: str
    kernel: str
    res: dict  # ptxas_resources() entry
    base: dict  # baseline entry or None
    status: str  # "ok", "better", or the reason it fails


def _rel(path):
    try:
        return str(Path(path).resolve().relative_to(KERNEL_DIR))
    except ValueError:
        return Path(path).name


def check(paths=None, archs=ARCHS, baseline=BASELINE, production=True):
    """Run the gate. Returns (ok, rows, errors, measured) where measured = {"sm_90": {file: {kernel: res}}}."""
    paths = [Path(p) for p in (paths or sources())]
    base = json.loads(Path(baseline).read_text()) if baseline and Path(baseline).exists() else {}
    errors, rows, measured = [], [], {}
    for path in paths:
        code = path.read_text()
        fname = _rel(path)
        errors += lint(code, fname, production)
        for arch in archs:
            key = f"sm_{arch}"
            try:
                _, log = compile_cubin(code, arch, fname, GATE_OPTIONS)
            except GateError as e:
                errors.append(str(e))
                continue
            warnings = [ln for ln in log.splitlines() if re.search(r"\bwarning\b", ln, flags=re.I)]
            if warnings:
                errors.append(f"{fname} ({key}): compiler warnings:\n  " + "\n  ".join(warnings))
            res = ptxas_resources(log)
            measured.setdefault(key, {})[fname] = res
            have = base.get(key, {}).get(fname, {})
            for kernel, r in sorted(res.items()):
                b = have.get(kernel)
                status = "ok"
                if r["stack"] or r["spill_stores"] or r["spill_loads"]:
                    status = (f"uses local memory ({r['stack']} bytes stack frame, {r['spill_stores']} bytes spill "
                              f"stores, {r['spill_loads']} bytes spill loads)")
                elif baseline and b is None:
                    status = "not in the baseline (new kernel? run python -m minisd.cuda.gate --update-baseline)"
                elif b is not None and (r["regs"] > b["regs"] or r["smem"] > b["smem"]):
                    status = (f"regressed: {r['regs']} registers / {r['smem']} bytes smem, baseline "
                              f"{b['regs']} / {b['smem']}")
                elif b is not None and (r["regs"] < b["regs"] or r["smem"] < b["smem"]):
                    status = "better"
                rows.append(Row(fname, key, kernel, r, b, status))
                if status not in ("ok", "better"):
                    errors.append(f"{fname} {kernel} ({key}): {status}")
            if baseline:
                for kernel in sorted(set(have) - set(res)):
                    errors.append(f"{fname} {kernel} ({key}): in the baseline but not in the source (removed? run "
                                  f"python -m minisd.cuda.gate --update-baseline)")
    if errors and base.get("nvrtc") and base.get("nvrtc") != _safe_version():
        errors.append(f"note: the baseline was recorded with NVRTC {base['nvrtc']}, this is NVRTC "
                      f"{_safe_version()}; if a register change comes from the compiler, accept it with "
                      f"--update-baseline")
    return not errors, rows, errors, measured


def _safe_version():
    try:
        return nvrtc_version()
    except GateError:
        return "?"


def write_baseline(measured, path=BASELINE):
    """Store {arch: {file: {kernel: {"regs", "smem"}}}} (+ the NVRTC version) as the new baseline. Files and
    architectures that were not measured keep their old entries (so checking one file updates only that file)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data["nvrtc"] = nvrtc_version()
    data["note"] = ("registers and static shared memory (bytes) per kernel, from NVRTC + ptxas -v; written by "
                    "python -m minisd.cuda.gate --update-baseline")
    for arch, files in measured.items():
        for f, ks in files.items():
            data.setdefault(arch, {})[f] = {k: {"regs": r["regs"], "smem": r["smem"]} for k, r in sorted(ks.items())}
    ordered = {k: data[k] for k in ("nvrtc", "note")}
    ordered.update({a: dict(sorted(data[a].items())) for a in sorted(k for k in data if k.startswith("sm_"))})
    # one line per kernel: diffs of the baseline then show exactly which kernel changed
    lines = ["{", f' "nvrtc": {json.dumps(ordered.pop("nvrtc"))},', f' "note": {json.dumps(ordered.pop("note"))},']
    for ai, (arch, files) in enumerate(ordered.items()):
        lines.append(f" {json.dumps(arch)}: {{")
        for fi, (f, ks) in enumerate(files.items()):
            lines.append(f"  {json.dumps(f)}: {{")
            for ki, (k, r) in enumerate(ks.items()):
                lines.append(f"   {json.dumps(k)}: {json.dumps(r)}" + ("," if ki < len(ks) - 1 else ""))
            lines.append("  }" + ("," if fi < len(files) - 1 else ""))
        lines.append(" }" + ("," if ai < len(ordered) - 1 else ""))
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def format_table(rows):
    lines = [f"{'file':16s} {'arch':5s} {'kernel':32s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill':>5s} "
             f"{'bars':>4s}  {'baseline':>10s}  status"]
    for r in rows:
        b = f"{r.base['regs']}/{r.base['smem']}" if r.base else "-"
        lines.append(f"{r.file:16s} {r.arch:5s} {r.kernel:32s} {r.res['regs']:4d} {r.res['smem']:6d} "
                     f"{r.res['stack']:5d} {r.res['spill_stores'] + r.res['spill_loads']:5d} {r.res['barriers']:4d}"
                     f"  {b:>10s}  {r.status}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisd.cuda.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="the .cu files to check (default: every kernels/*.cu)")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), help="SM architectures (default: 80 90)")
    p.add_argument("--baseline", default=str(BASELINE), help="resource baseline JSON (default: %(default)s)")
    p.add_argument("--update-baseline", action="store_true", help="rewrite the baseline with the measured usage")
    args = p.parse_args(argv)
    try:
        print(f"NVRTC {nvrtc_version()}, options {' '.join(NVRTC_OPTIONS + GATE_OPTIONS)}")
        ok, rows, errors, measured = check(args.files or None, args.arch,
                                           None if args.update_baseline else args.baseline)
    except GateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.update_baseline:
        errors = [e for e in errors if "baseline" not in e]
        if errors:
            print("\nnot updating the baseline; fix these first:\n" + "\n".join(errors), file=sys.stderr)
            return 1
        write_baseline(measured, args.baseline)
        print(f"\nbaseline written: {args.baseline}")
        return 0
    if errors:
        print("\nFAILED:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    print(f"\ngate passed: {len({r.file for r in rows})} files, {len({(r.file, r.kernel) for r in rows})} kernels, "
          f"archs {', '.join('sm_' + a for a in args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

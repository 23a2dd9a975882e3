"""Run a command with the AddressSanitizer runtime preloaded, for the emulator's sanitize mode.

    python -m minisd.cuda.emu.asan python -m pytest tests/test_cuda_kernels.py
    python -m minisd.cuda.emu.asan python my_script.py

Why: a module built with -fsanitize=address can only be loaded into a process whose *first* loaded library is the
ASan runtime; Python itself is not instrumented, so the runtime is injected with LD_PRELOAD (g++'s libasan.so).
Leak checking is off (Python "leaks" by design at exit); the first ASan or UBSan error aborts the process with a
report naming the .cu file and line, so callers run sanitized launches in a subprocess and read its stderr.
"""
import os
import subprocess
import sys


def libasan_path(cxx=None):
    """Absolute path of the compiler's libasan.so (g++ -print-file-name=libasan.so)."""
    cxx = cxx or os.environ.get("CXX", "g++")
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"{cxx} has no libasan.so (got {path!r}); install the compiler's ASan runtime "
                           f"(Debian/Ubuntu: apt-get install libasan8, or the one matching your g++)")
    return path


def sanitizer_env(base=None):
    """A copy of the environment (default os.environ) that preloads libasan and sets the sanitizer options."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(p for p in (libasan_path(), env.get("LD_PRELOAD", "")) if p)
    # detect_leaks=0: CPython never frees everything at exit. verify_asan_link_order=0 would hide a missing
    # preload; it is not needed because the runtime is preloaded first.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def main(argv):
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    os.execvpe(argv[0], argv, sanitizer_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

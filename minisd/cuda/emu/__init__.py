"""CPU emulator for minisd's CUDA kernels: run the unchanged .cu source under g++ on NumPy arrays.

    from minisd.cuda.emu import EmuRawModule
    mod = EmuRawModule(code=kernels.source("softmax"), name="kernels/softmax.cu")
    mod.get_function("softmax_forward_v3")(grid, block, args, shared_mem=0)

cuda_emu.h is the device side (fibers, scheduler, intrinsics); emu.py the host side (build cache, argument and
launch checks); asan.py runs a command with the sanitizer runtime loaded; selftest.cu holds the kernels that
tests/test_cuda_emulator.py uses to check the emulator's own semantics.
"""
from .emu import (EmuArgumentError, EmuBuildError, EmuError, EmuKernelError, EmuLaunchError, EmuRawKernel,
                  EmuRawModule, asan_loaded, cache_dir)

__all__ = ["EmuRawModule", "EmuRawKernel", "EmuError", "EmuBuildError", "EmuLaunchError", "EmuArgumentError",
           "EmuKernelError", "asan_loaded", "cache_dir"]

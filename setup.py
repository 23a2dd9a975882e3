"""minisd: Stable Diffusion from scratch in NumPy, with hand-written backward passes.

Install for use:            pip install .
Install for development:    pip install -e ".[test,reference]"   (torch: pip install torch==2.13.0 first)
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_kernels(build_py):
    """Copy the CUDA sources (kernels/, a folder of .cu files, not a package) into the wheel as minisd/cuda/kernels.

    kernels/ is deliberately not an importable top-level package: it would shadow Hugging Face's `kernels`
    package, which transformers imports. minisd/cuda/sources.py finds either location.
    """

    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "kernels"
        dst = Path(self.build_lib) / "minisd" / "cuda" / "kernels"
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))


setup(
    name="minisd",
    version="0.1.0",
    description="Stable Diffusion from scratch in NumPy: forward and backward, exact against the references",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minisd", "minisd.*", "weights_convert", "weights_convert.*"]),
    cmdclass={"build_py": build_py_with_kernels},
    # The CLIP BPE vocabulary and the default tiny model ship inside the package.
    # (the CUDA C sources in kernels/ are copied in by build_py_with_kernels above)
    package_data={"minisd": ["data/*.gz", "data/*.json", "data/*.safetensors", "data/*.npz", "data/LICENSE*"]},
    install_requires=["numpy>=1.24", "pillow>=9", "tqdm>=4.60"],
    extras_require={
        "gpu": ["cupy-cuda13x>=13"],
        # What the tests need beyond the runtime deps (the CUDA compile gate uses NVRTC from pip, no GPU).
        # NVRTC is pinned: the register/shared-memory baseline of the compile gate was recorded with 13.5.
        "test": ["pytest>=7", "cupy-cuda13x>=13", "nvidia-cuda-nvrtc==13.5.*", "nbclient>=0.7", "nbformat>=5",
                 "ipykernel", "matplotlib>=3.5", "regex"],
        # The references minisd is checked against. torch must be installed with
        # `pip install torch==2.13.0` first (a plain `torch` pulls GBs of CUDA wheels).
        "reference": ["torch>=2.0", "diffusers>=0.30", "transformers>=4.40", "safetensors>=0.4", "ftfy", "scipy"],
    },
    entry_points={"console_scripts": ["minisd=minisd.cli:main"]},
)

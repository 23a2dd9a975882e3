"""minisd: Stable Diffusion from scratch in NumPy, with hand-written backward passes.

Install for use:            pip install .
Install for development:    pip install -e ".[test,reference]"   (torch: pip install torch==2.13.0 first)
"""
from setuptools import find_packages, setup

setup(
    name="minisd",
    version="0.1.0",
    description="Stable Diffusion from scratch in NumPy: forward and backward, exact against the references",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minisd", "minisd.*", "weights_convert", "weights_convert.*", "kernels",
                                    "kernels.*"]),
    # The CLIP BPE vocabulary and the default tiny model ship inside the package.
    package_data={"minisd": ["data/*.gz", "data/*.json", "data/*.safetensors", "data/*.npz", "data/LICENSE*"],
                  # CUDA C sources travel with the package: cupy.RawModule and the CPU emulator compile them
                  "kernels": ["*.cu", "*.json", "*.md", "bugs/*.cu", "emu/*.h", "emu/*.cu"]},
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

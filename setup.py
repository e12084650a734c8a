"""mose_fast: fast Multiplicative Orthogonal Sequential Editing (MOSE) for HF causal LMs.

Layout: the library in mose_fast/, Triton kernels in kernels/ installed as mose_fast.kernels
(a global top-level package named `kernels` would collide with other projects), CUDA C++ in
csrc/ compiled lazily on a CUDA machine (torch.utils.cpp_extension + ninja), never at install.
"""
from setuptools import setup

# GPU extras.  CuPy ships one wheel per CUDA major version and must match the CUDA that torch was
# built with (``python -c "import torch; print(torch.version.cuda)"``): a cupy-cuda12x next to a
# CUDA 13 torch finds no matching runtime, or loads a second one.  Which one fits cannot be decided
# reliably while pip resolves, so the extra names it:
#     torch.version.cuda 12.x  ->  pip install -e ".[gpu-cuda12]"   (cupy-cuda12x)
#     torch.version.cuda 13.x  ->  pip install -e ".[gpu-cuda13]"   (cupy-cuda13x)
#     anything else            ->  pip install -e ".[gpu]"          (no CuPy: the cuSOLVER polar
#                                                                    methods are skipped)
# `python -m mose_fast.gpu_env --install-hint` prints the line for the torch installed.  The csrc
# extension also needs nvcc of torch's CUDA major version (the CUDA toolkit), which pip does not bring.
GPU = ["triton>=3.2", "ninja>=1.11"]
EXTRAS = {
    "triton": ["triton>=3.2"],
    "gpu": GPU,
    "gpu-cuda12": GPU + ["cupy-cuda12x>=13"],
    "gpu-cuda13": GPU + ["cupy-cuda13x>=14"],
    "eval": ["matplotlib>=3.7"],
    "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.2", "scipy>=1.10", "ruff>=0.17,<0.18"],
}

setup(
    name="mose-fast",
    version="0.1.0",
    description="Multiplicative Orthogonal Sequential Editing (closed-form MOSE) for Hugging Face causal LMs",
    python_requires=">=3.10",
    packages=["mose_fast", "mose_fast.hf", "mose_fast.memit", "mose_fast.solve", "mose_fast.rules", "mose_fast.eval",
              "mose_fast.kernels", "mose_fast.csrc"],
    package_dir={"mose_fast": "mose_fast", "mose_fast.kernels": "kernels", "mose_fast.csrc": "csrc"},
    package_data={"mose_fast.csrc": ["*.cu", "*.cpp"]},
    install_requires=[
        # torch 2.13.0: the CPU wheel on CPU-only machines (a bare `torch` pulls CUDA builds)
        "torch==2.13.0",
        # the versions the test suite runs with: transformers' cache API and GGUF loader change
        # between minor releases (`past_key_values` → `cache`), so newer ones are admitted only
        # after the suite has run with them
        "transformers==5.24.0",
        "accelerate==1.15.0",   # device_map placement; transformers needs it to load GGUF files
        "gguf==0.19.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.26",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mose-fast=mose_fast.cli:main"]},
)

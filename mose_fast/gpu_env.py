"""What this machine's GPU stack can run, and the pip command for the GPU extras that match it.

    python -m mose_fast.gpu_env                  # torch and its CUDA, Triton, CuPy, nvcc / csrc
    python -m mose_fast.gpu_env --install-hint   # e.g. pip install -e '.[gpu-cuda13]'

CuPy must be the wheel of torch's CUDA major version (``cupy-cuda12x`` for ``torch.version.cuda``
12.x, ``cupy-cuda13x`` for 13.x: the ``gpu-cuda12`` / ``gpu-cuda13`` extras); csrc needs an nvcc of
that major version too.  Nothing here runs at import.
"""
from __future__ import annotations


def lines() -> list[str]:
    import importlib.util

    import torch

    from . import backends, cuda_ext
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    triton = importlib.util.find_spec("triton") is not None
    return [f"GPU: {', '.join(gpus) if gpus else 'none'}",
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none (CPU build)'}",
            f"triton: {'installed' if triton else 'not installed'}",
            f"cupy: {backends.cupy_status()[1]}",
            f"csrc: {cuda_ext.csrc_status()[1]}",
            f"GPU extras: {backends.install_hint()}"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mose_fast.gpu_env", description=__doc__.split("\n")[0])
    ap.add_argument("--install-hint", action="store_true",
                    help="print only the pip command for the GPU extras that match this torch's CUDA")
    args = ap.parse_args(argv)
    if args.install_hint:
        from .backends import install_hint
        print(install_hint())
        return 0
    print("\n".join(lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""mose_fast: Multiplicative Orthogonal Sequential Editing (MOSE) for Hugging Face causal LMs.

Public API::

    from mose_fast import MOSEEditor, MOSEConfig, EditRequest, load_model
    model, tok = load_model()                       # embedded SmolLM2-135M-Instruct
    editor = MOSEEditor(model, tok, MOSEConfig(layers=[4, 5, 6, 7, 8], lam=100.0))
    editor.edit(EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"))
"""
from __future__ import annotations

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path


def _register_source_kernels() -> None:
    # The Triton kernels live in the top-level folder kernels/ and are *installed* as
    # mose_fast.kernels (setup.py package_dir).  In a source checkout or an editable install the
    # folder is beside this package, so register it under its installed name.
    here = _Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or "mose_fast.kernels" in _sys.modules:
        return
    src = here.parent / "kernels" / "__init__.py"
    if src.is_file():
        spec = _ilu.spec_from_file_location("mose_fast.kernels", src, submodule_search_locations=[str(src.parent)])
        module = _ilu.module_from_spec(spec)
        _sys.modules["mose_fast.kernels"] = module
        spec.loader.exec_module(module)
        globals()["kernels"] = module


_register_source_kernels()

from .arch import ARCHS, ArchSpec  # noqa: E402
from .config import MOSEConfig  # noqa: E402
from .editor import EditRecord, LayerRecord, MOSEEditor  # noqa: E402
from .models import DEFAULT_MODEL, load_model  # noqa: E402
from .procrustes import solve_rotation  # noqa: E402
from .requests import EditRequest, load_requests  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ARCHS", "ArchSpec", "DEFAULT_MODEL", "EditRecord", "EditRequest", "LayerRecord", "MOSEConfig",
           "MOSEEditor", "load_model", "load_requests", "solve_rotation", "__version__"]

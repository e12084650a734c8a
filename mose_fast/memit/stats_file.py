"""A statistics file: the key statistics C0 of a model's layers, computed once and used wherever that
model is edited — the path by which the statistics of a large model are computed on a big machine
(``mose-fast stats --out FILE``) and the model is edited elsewhere (``--stats FILE``,
``MOSEEditor(statistics_file=FILE)``).

One safetensors file: ``C0.<layer>`` (d_in × d_in, float64, E[k·kᵀ] over the corpus) and, in its
metadata, what the statistics belong to — the model family, depth, widths and vocabulary, a
fingerprint of the tokenizer (its vocabulary and special tokens), the corpus and its token count.
:func:`check_statistics` compares that with a model's config and tokenizer *before* the model's
weights are loaded, and names the file and the field that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

FORMAT = "mose_fast.stats.v1"
# metadata fields compared with the model a file is used with
IDENTITY_FIELDS = ("model_type", "num_layers", "hidden_size", "vocab_size", "tokenizer")


def tokenizer_fingerprint(tok) -> str:
    """SHA-256 of a tokenizer's vocabulary (token → id) and its special tokens: two tokenizers
    with the same fingerprint turn every text into the same ids."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())}).encode())
    return h.hexdigest()[:32]


def model_identity(config, tok) -> dict[str, str]:
    """What a statistics file records of the model it belongs to (strings, as safetensors metadata)."""
    from .. import plan
    meta = plan.meta_model(config)
    from ..hf.arch import resolve_arch
    arch = resolve_arch(meta)
    return {"model_type": str(getattr(config, "model_type", "")), "num_layers": str(arch.num_layers(meta)),
            "hidden_size": str(getattr(config, "hidden_size", getattr(config, "n_embd", ""))),
            "vocab_size": str(getattr(config, "vocab_size", "")), "tokenizer": tokenizer_fingerprint(tok)}


def key_widths(config, layers: list[int]) -> dict[int, int]:
    """d_in of each layer's FFN output projection (the size of its C0), from the config alone."""
    from .. import plan
    from ..hf.arch import resolve_arch
    meta = plan.meta_model(config)
    arch = resolve_arch(meta)
    return {l: int(arch.weight_view(meta, l).shape[1]) for l in layers}


def save_statistics(path: str | os.PathLike, second_moments: dict[int, torch.Tensor], config, tok,
                    corpus: str, n_tokens: int, model_fingerprint: str | None = None) -> Path:
    """Write ``{layer: C0}`` with the identity of the model (``config``, ``tok``) it was computed on."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"statistics file {path} is a folder; give a file name (e.g. {path / 'stats.safetensors'})")
    widths = key_widths(config, sorted(second_moments))
    for l, c in second_moments.items():
        if tuple(c.shape) != (widths[l], widths[l]):
            raise ValueError(f"C0 of layer {l} is {tuple(c.shape)}, the model's keys there have width {widths[l]}")
    meta = {"format": FORMAT, **model_identity(config, tok), "layers": json.dumps(sorted(second_moments)),
            "corpus": str(corpus), "n_tokens": str(n_tokens), "model_fingerprint": model_fingerprint or "",
            "created": time.strftime("%F %T")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({f"C0.{l}": c.detach().to("cpu", torch.float64).contiguous() for l, c in second_moments.items()},
              str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {tensor name: shape}) of a statistics file, without reading its tensors."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"statistics file {path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"statistics file {path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                         "(written by `mose-fast stats --out`)")
    return meta, shapes


def check_statistics(path: str | os.PathLike, config, tok, layers: list[int]) -> dict[str, str]:
    """ValueError naming ``path`` and the field if the file does not belong to the model of ``config``
    and ``tok`` or lacks one of ``layers``; its metadata otherwise.  Reads no tensor and no weight."""
    meta, shapes = read_header(path)
    mine = model_identity(config, tok)
    for field in IDENTITY_FIELDS:
        if meta.get(field) != mine[field]:
            what = "a different tokenizer (vocabulary or special tokens)" if field == "tokenizer" else \
                f"{field} {meta.get(field)!r}, the model's is {mine[field]!r}"
            raise ValueError(f"statistics file {path} belongs to another model: {field} differs ({what})")
    missing = [l for l in layers if f"C0.{l}" not in shapes]
    if missing:
        raise ValueError(f"statistics file {path}: layers {json.loads(meta.get('layers', '[]'))} held, "
                         f"the edit needs {missing} too")
    widths = key_widths(config, layers)
    for l in layers:
        if shapes[f"C0.{l}"] != (widths[l], widths[l]):
            raise ValueError(f"statistics file {path}: C0.{l} is {shapes[f'C0.{l}']}, the model's keys at layer {l} "
                             f"have width {widths[l]}")
    return meta


def load_statistics(path: str | os.PathLike, config, tok, layers: list[int],
                    device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
    """``{layer: C0}`` (float64) of ``layers`` from a file :func:`check_statistics` accepts."""
    from safetensors import safe_open
    check_statistics(path, config, tok, layers)
    with safe_open(str(path), "pt", device=str(device)) as f:
        return {l: f.get_tensor(f"C0.{l}") for l in layers}

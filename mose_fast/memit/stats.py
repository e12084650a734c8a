"""Second moment of the FFN output projection's inputs, ``C0 = E[k kᵀ]``, over a text corpus.

Streamed in fixed-length windows, the forward pass stopped after the deepest requested layer,
accumulated in float64, and cached on disk as safetensors.  The cache file's metadata holds the
full key (model fingerprint, layer, corpus hash, token count, window length); a file whose
metadata does not match is recomputed and overwritten, never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..hf.arch import ArchSpec
from ..hf.hooks import capture_inputs, run_until

log = logging.getLogger(__name__)
CACHE_FORMAT = "mose_fast.C0.v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOSE_CACHE_DIR", Path.home() / ".cache" / "mose_fast"))


def default_data_dir() -> Path:
    """Evaluation data: $MOSE_DATA_DIR, else ../shared/data beside the current checkout."""
    env = os.environ.get("MOSE_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    return here.parent / "shared" / "data"


def read_corpus(corpus: str | os.PathLike | Iterable[str]) -> list[str]:
    """A corpus as a list of non-empty texts: a text file (one paragraph a line; WikiText
    headings ``= ... =`` skipped) or any iterable of strings."""
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"statistics corpus {path} is not a file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [t for t in texts if t and not (t.startswith("=") and t.endswith("="))]
    else:
        texts = []
        for i, t in enumerate(corpus):
            if not isinstance(t, str):
                raise ValueError(f"corpus item #{i} is a {type(t).__name__}, expected str")
            if t.strip():
                texts.append(t)
    if not texts:
        raise ValueError("statistics corpus is empty")
    return texts


def corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """Identity of a model's weights: its config plus a strided sample of every parameter.

    Cheap (no full pass over a 13B model) yet changes when any edit rotates a matrix, since a
    rotation moves essentially every entry."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("mose_") and k != "_name_or_path"}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step][:sample].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _token_windows(tok, texts: list[str], n_tokens: int, seq_len: int) -> list[list[int]]:
    """Concatenate the texts (EOS between them) and cut windows of ``seq_len`` tokens, enough to
    hold ``n_tokens`` keys.  Models whose tokenizer adds a BOS get one at each window's start."""
    bos = tok("a")["input_ids"][0] if tok.bos_token_id is not None and \
        tok("a")["input_ids"][0] == tok.bos_token_id else None
    body = seq_len - (1 if bos is not None else 0)
    sep = tok.eos_token_id
    windows, buf = [], []
    for text in texts:
        buf.extend(tok(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            windows.append(([bos] if bos is not None else []) + buf[:body])
            buf = buf[body:]
            if len(windows) * seq_len >= n_tokens:
                return windows
    if buf:
        windows.append(([bos] if bos is not None else []) + buf)
    return windows


@torch.no_grad()
def compute_second_moments(model, tok, arch: ArchSpec, layers: list[int], texts: list[str],
                           n_tokens: int, seq_len: int = 256, batch_size: int = 8,
                           progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """``{layer: E[k kᵀ]}`` (float64) over the first ``n_tokens`` tokens, and the count used."""
    device = next(model.parameters()).device
    windows = _token_windows(tok, texts, n_tokens, seq_len)
    modules = {str(l): arch.mlp_out_module(model, l) for l in layers}
    deepest = arch.block(model, max(layers))
    sums: dict[int, torch.Tensor] = {}
    count = 0
    bar = tqdm(total=n_tokens, desc="key statistics C0", unit="tok", disable=not progress)
    for b in range(0, len(windows), batch_size):
        if count >= n_tokens:
            break
        batch = windows[b:b + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, w in enumerate(batch):
            ids[i, :len(w)] = torch.tensor(w)
            mask[i, :len(w)] = 1
        keep = mask.reshape(-1).bool()
        take = min(int(keep.sum()), n_tokens - count)
        with capture_inputs(modules) as seen:
            run_until(model, deepest, input_ids=ids.to(device), attention_mask=mask.to(device))
        for l in layers:
            k = seen[str(l)][0].reshape(-1, seen[str(l)][0].shape[-1])[keep.to(device)][:take]
            k = k.to(torch.float64)
            if l not in sums:
                sums[l] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=device)
            sums[l].addmm_(k.T, k)
        count += take
        bar.update(take)
    bar.close()
    if count == 0:
        raise ValueError("statistics corpus produced no tokens")
    return {l: s / count for l, s in sums.items()}, count


def key_second_moments(model, tok, arch: ArchSpec, layers: list[int],
                       corpus: str | os.PathLike | Iterable[str], n_tokens: int = 100_000,
                       seq_len: int = 256, batch_size: int = 8, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, fingerprint: str | None = None) -> dict[int, torch.Tensor]:
    """``C0`` for each layer, from the disk cache when its key matches, else computed and cached."""
    texts = read_corpus(corpus)
    chash = corpus_hash(texts)
    fingerprint = fingerprint or model_fingerprint(model)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out: dict[int, torch.Tensor] = {}
    missing = []
    for l in layers:
        meta = _cache_meta(fingerprint, l, chash, n_tokens, seq_len)
        path = cache / _cache_name(meta)
        c0 = _load_cached(path, meta)
        if c0 is None:
            missing.append(l)
        else:
            out[l] = c0.to(next(model.parameters()).device)
    if missing:
        computed, count = compute_second_moments(model, tok, arch, missing, texts, n_tokens, seq_len,
                                                 batch_size, progress)
        cache.mkdir(parents=True, exist_ok=True)
        for l, c0 in computed.items():
            meta = _cache_meta(fingerprint, l, chash, n_tokens, seq_len)
            meta["tokens_used"] = str(count)
            save_file({"C0": c0.cpu().contiguous()}, str(cache / _cache_name(meta)), metadata=meta)
            out[l] = c0
    return out


def _cache_meta(fingerprint: str, layer: int, chash: str, n_tokens: int, seq_len: int) -> dict[str, str]:
    return {"format": CACHE_FORMAT, "model": fingerprint, "layer": str(layer), "corpus": chash,
            "n_tokens": str(n_tokens), "seq_len": str(seq_len)}


def _cache_name(meta: dict[str, str]) -> str:
    key = "|".join(meta[k] for k in ("format", "model", "layer", "corpus", "n_tokens", "seq_len"))
    return f"C0_L{meta['layer']}_{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _load_cached(path: Path, meta: dict[str, str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        if any(stored.get(k) != v for k, v in meta.items()):
            log.warning("statistics cache %s does not match this model/corpus/count; recomputing", path)
            return None
        return load_file(str(path))["C0"]
    except Exception as e:  # a truncated or foreign file is recomputed, not trusted
        log.warning("statistics cache %s unreadable (%s); recomputing", path, e)
        return None

"""Second moment of the FFN output projection's inputs, ``C0 = E[k kᵀ]``, over a text corpus.

Streamed in fixed-length windows, the forward pass stopped after the deepest requested layer, each
batch's Gram formed in float32 (float64 for a float64 model) and added into a float64 sum, and
cached on disk as safetensors.

The corpus is the configured text file, else WikiText-2 in the data folder, else — nothing beside
the checkout — text the model writes itself from a fixed set of varied openings under a fixed seed
(``generated_corpus``, cached on disk like the statistics).  The cache file's metadata holds the
full key (model fingerprint, layer, corpus hash, token count, window length); a file whose
metadata does not match is recomputed and overwritten, never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
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


# Openings for the generated corpus: varied registers and topics, so the model's own continuations
# cover more of its key space than one kind of text would.
OPENINGS = (
    "The history of the city began", "In the early years of the twentieth century,", "Scientists have found that",
    "The recipe calls for", "According to the annual report,", "She opened the letter and read",
    "The match ended in", "In mathematics, a group is", "The president announced on Tuesday that",
    "My favourite book as a child was", "The river flows through", "To install the software, first",
    "The museum's collection includes", "He was born in a small village", "The weather forecast for tomorrow",
    "Photosynthesis is the process by which", "The company was founded in", "Once upon a time,",
    "The album was released in", "In the kitchen, the", "The treaty was signed by", "Dear customer, we",
    "The main causes of the war were", "The team's new coach said", "The planet Mars has",
    "The law requires that", "Yesterday I went to the market and", "The song became popular in",
    "A healthy diet should include", "The village is known for", "The university offers courses in",
    "The film tells the story of", "During the storm, the", "The language is spoken by",
    "The engine works by", "In the novel, the main character", "The bridge was built in",
    "Researchers at the university", "The capital of the country is", "The painting shows",
    "The election results showed", "The species lives in", "Q: What is the best way to", "The following steps describe",
    "Breaking news:", "The old man told the children", "The tournament was held in", "The doctor explained that",
    "The island has a population of", "The ancient Romans built", "The smartphone features a",
    "The king ordered his soldiers to", "When the train arrived at the station,", "The chemical element",
    "The festival takes place every year in", "In economics, inflation is", "The band was formed in",
    "The mountain is the highest peak in", "The children played in the garden while", "The software update includes",
    "The battle took place near", "Her grandmother used to say that", "The theory of evolution explains",
    "The restaurant serves",
)


def default_cache_dir_for(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


@torch.no_grad()
def generated_corpus(model, tok, n_tokens: int, seed: int = 0, length: int = 128,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     fingerprint: str | None = None) -> list[str]:
    """Text the model writes itself: sampled continuations (top-k 50, temperature 1) of ``OPENINGS``,
    round after round, until about ``n_tokens`` tokens; the same model, seed and size give the same
    texts, cached in ``cache_dir`` as JSON keyed by them."""
    fingerprint = fingerprint or model_fingerprint(model)
    key = hashlib.sha256(f"gen.v1|{fingerprint}|{n_tokens}|{seed}|{length}|{len(OPENINGS)}".encode()).hexdigest()[:24]
    path = default_cache_dir_for(cache_dir) / f"corpus_{key}.json"
    if path.is_file():
        try:
            texts = json.loads(path.read_text())
            if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
                return texts
        except (OSError, json.JSONDecodeError):
            pass
        log.warning("generated corpus cache %s unreadable; generating again", path)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts, made = [], 0
    bar = tqdm(total=n_tokens, desc="statistics corpus (generated)", unit="tok", disable=not progress)
    batch = 32
    rounds = 0
    while made < n_tokens:
        for b in range(0, len(OPENINGS), batch):
            openings = OPENINGS[b:b + batch]
            enc = [tok(o)["input_ids"] for o in openings]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(enc):          # left-padded prompts
                ids[i, width - len(e):] = torch.tensor(e)
                mask[i, width - len(e):] = 1
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 top_k=50, temperature=1.0, max_new_tokens=length, min_new_tokens=length // 2,
                                 pad_token_id=pad)
            for row in out[:, width:]:
                text = tok.decode(row, skip_special_tokens=True).strip()
                if text:
                    texts.append(text)
            made += int((out[:, width:] != pad).sum()) + int(mask.sum())
            bar.update(min(n_tokens, made) - bar.n)
            if made >= n_tokens:
                break
        rounds += 1
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(texts))
    os.replace(tmp, path)
    return texts


def statistics_corpus(stats_corpus: str | os.PathLike | None, data_dir: str | os.PathLike | None, model, tok,
                      seed: int, n_tokens: int, cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """What C0 is computed over: ``stats_corpus`` if given, else ``wikitext-2/valid.txt`` in
    ``data_dir`` (default: ``default_data_dir()``) if present, else ``generated_corpus``."""
    if stats_corpus is not None:
        return str(stats_corpus)
    wiki = Path(data_dir if data_dir is not None else default_data_dir()) / "wikitext-2" / "valid.txt"
    if wiki.is_file():
        return str(wiki)
    log.info("no statistics corpus given and %s not found: using text the model generates", wiki)
    return generated_corpus(model, tok, n_tokens, seed, cache_dir=cache_dir, progress=progress)


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
    t0 = time.perf_counter()
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
            k = seen[str(l)][0]
            k = k.reshape(-1, k.shape[-1])[keep.to(k.device)][:take]
            # one batch's Gram in float32 (a few thousand keys), the running sum in float64
            k = k.to(torch.float64 if k.dtype == torch.float64 else torch.float32)
            if l not in sums:
                sums[l] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
            sums[l].add_(k.T @ k)
        count += take
        bar.update(take)
    bar.close()
    if count == 0:
        raise ValueError("statistics corpus produced no tokens")
    seconds = time.perf_counter() - t0
    log.info("key statistics: %d tokens in %.1f s (%.0f tokens/s), layers %s", count, seconds,
             count / max(seconds, 1e-9), layers)
    return {l: s / count for l, s in sums.items()}, count


def key_second_moments(model, tok, arch: ArchSpec, layers: list[int],
                       corpus: str | os.PathLike | Iterable[str], n_tokens: int = 100_000,
                       seq_len: int = 256, batch_size: int = 8, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, fingerprint: str | None = None) -> dict[int, torch.Tensor]:
    """``C0`` for each layer, from the disk cache when its key matches, else computed and cached."""
    texts = read_corpus(corpus)
    chash = corpus_hash(texts)
    fingerprint = fingerprint or model_fingerprint(model)
    cache = default_cache_dir_for(cache_dir)
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

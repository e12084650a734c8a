"""Second moment of the FFN output projection's inputs, ``C0 = E[k kᵀ]``, over a text corpus —
and, in the same forward pass, the statistics of the other edited modules (``MOSEConfig.modules``):

    "mlp.down"  C0  = E[k kᵀ], k the FFN output projection's input
    "attn.v"    Cu  = E[u uᵀ], u the attention output projection's input (d_q × d_q)
    "attn.qk"   Cqk = E[k kᵀ] + Σ_s E[q_s q_sᵀ] in the kv space (d_kv × d_kv): k the k_proj output,
                q_s the query slot s (q heads g·G + s of every kv head g), both before the rotary map
    "mlp.in"    Cx  = E[x xᵀ], x the FFN input; and a histogram of the FFN pre-activations (the
                gate / single input projection's output, bias included), for the polynomial fit

Streamed in fixed-length windows, the forward pass stopped after the deepest requested layer, each
batch's Gram formed in float32 (float64 for a float64 model) and added into a float64 sum, and
cached on disk as safetensors, one file per (statistic, layer).

The corpus is the configured text file, else WikiText-2 in the data folder, else — nothing beside
the checkout — text the model writes itself from a fixed set of varied openings under a fixed seed
(``generated_corpus``, cached on disk like the statistics).  The cache file's metadata holds the
full key (model fingerprint, layer, corpus hash, token count, window length); a file whose
metadata does not match is recomputed and overwritten, never reused.
"""
from __future__ import annotations

import contextlib
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
from ..hf.hooks import capture_inputs, capture_outputs, run_until

log = logging.getLogger(__name__)
CACHE_FORMAT = "mose_fast.C0.v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOSE_CACHE_DIR", Path.home() / ".cache" / "mose_fast"))


def default_data_dir() -> Path:
    """Evaluation data: $MOSE_DATA_DIR, else ../shared/data beside the current checkout."""
    env = os.environ.get("MOSE_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]      # the checkout (mose_fast/memit/stats.py)
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


# The generated corpus: rows per generate call (each opening twice per round), new tokens per row, and
# how many tokens it has when no corpus is given (see ``generated_corpus``; docs/research.md §9).
GENERATION_ROWS = 128
GENERATION_LENGTH = 128
GENERATED_TOKENS = 30_000


def generation_dtype(model) -> torch.dtype | None:
    """The dtype a float32 model's generation runs its products in: bfloat16 on a CPU with native bf16
    dot products (AVX-512 BF16 or AMX: 1.4× the float32 throughput at 128 rows on a 2-core EPYC), else
    None (the model's own dtype, as on a GPU, where generation is not the bottleneck)."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        return None
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else None


@torch.no_grad()
def generated_corpus(model, tok, n_tokens: int, seed: int = 0, length: int = GENERATION_LENGTH,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     fingerprint: str | None = None, rows: int = GENERATION_ROWS) -> list[str]:
    """Text the model writes itself: sampled continuations (top-k 50, temperature 1) of ``OPENINGS``,
    ``rows`` at a time in one batched ``generate`` (key/value cache; bf16 products where the CPU has
    them, ``generation_dtype``), round after round until about ``n_tokens`` tokens.  Round r's
    sampling seed is the r-th draw of a generator seeded with ``seed``, so a corpus of fewer tokens is
    a prefix of one of more.  The same model, seed and size give the same texts, cached in
    ``cache_dir`` as JSON keyed by them."""
    fingerprint = fingerprint or model_fingerprint(model)
    low = generation_dtype(model)
    key = hashlib.sha256(f"gen.v2|{fingerprint}|{n_tokens}|{seed}|{length}|{rows}|{low}|{len(OPENINGS)}"
                         .encode()).hexdigest()[:24]
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
    openings = [OPENINGS[i % len(OPENINGS)] for i in range(rows)]
    enc = [tok(o)["input_ids"] for o in openings]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):          # left-padded prompts
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    ids, mask = ids.to(device), mask.to(device)
    texts, made = [], 0
    bar = tqdm(total=n_tokens, desc="statistics corpus (generated, once)", unit="tok", disable=not progress)
    while made < n_tokens:
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
        with torch.autocast(device.type, dtype=low) if low is not None else contextlib.nullcontext():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=50, temperature=1.0,
                                 max_new_tokens=length, min_new_tokens=length // 2, pad_token_id=pad)
        for row in out[:, width:]:
            text = tok.decode(row, skip_special_tokens=True).strip()
            if text:
                texts.append(text)
        made += int((out[:, width:] != pad).sum()) + int(mask.sum())
        bar.update(min(n_tokens, made) - bar.n)
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
    return generated_corpus(model, tok, min(n_tokens, GENERATED_TOKENS), seed, cache_dir=cache_dir, progress=progress)


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
        if str((d.get("quantization_config") or {}).get("quant_method", "")).lower().endswith("gguf"):
            del d["quantization_config"]     # dequantised on load: the same floats as its converted copy
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


class StreamingHistogram:
    """A histogram of a stream of values with fixed-width bins on an absolute grid (bin j holds
    [j·w, (j+1)·w)), grown as values arrive; per bin the count and the sum of the values, so the
    bins' means are exact.  The width is set from the first batch (its range / ``bins``) and doubled
    (neighbouring bins merged) whenever more than ``max_bins`` would be needed.  Kept on the device
    of the values (float64)."""

    def __init__(self, bins: int = 4096, max_bins: int = 1 << 16):
        self.bins, self.max_bins = bins, max_bins
        self.width: float | None = None
        self.lo = 0                                     # absolute index of counts[0]
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.sums = torch.zeros(0, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        x = x[torch.isfinite(x)]
        if not x.numel():
            return
        if self.counts.device != x.device:
            self.counts, self.sums = self.counts.to(x.device), self.sums.to(x.device)
        if self.width is None:
            span = float(x.max() - x.min())
            self.width = span / self.bins if span > 0 else max(abs(float(x[0])), 1.0) * 1e-3
            self.lo = int(torch.floor(x.min() / self.width))
        idx = torch.floor(x / self.width).long()
        lo, hi = min(self.lo, int(idx.min())), max(self.lo + len(self.counts) - 1, int(idx.max()))
        while hi - lo + 1 > self.max_bins:
            self._coarsen()
            idx = torch.div(idx, 2, rounding_mode="floor")
            lo, hi = min(self.lo, int(idx.min())), max(self.lo + len(self.counts) - 1, int(idx.max()))
        if lo < self.lo or hi >= self.lo + len(self.counts):
            pad_lo, pad_hi = self.lo - lo, hi - (self.lo + len(self.counts) - 1)
            z = lambda n: torch.zeros(n, dtype=torch.float64, device=x.device)
            self.counts = torch.cat([z(pad_lo), self.counts, z(pad_hi)])
            self.sums = torch.cat([z(pad_lo), self.sums, z(pad_hi)])
            self.lo = lo
        self.counts.index_add_(0, idx - self.lo, torch.ones_like(x))
        self.sums.index_add_(0, idx - self.lo, x)

    def _coarsen(self) -> None:
        dev = self.counts.device
        j = torch.div(torch.arange(self.lo, self.lo + len(self.counts), device=dev), 2, rounding_mode="floor")
        new_lo = int(j[0]) if len(j) else self.lo // 2
        n = int(j[-1]) - new_lo + 1 if len(j) else 0
        counts = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, j - new_lo, self.counts)
        sums = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, j - new_lo, self.sums)
        self.counts, self.sums, self.lo, self.width = counts, sums, new_lo, self.width * 2

    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin means, counts) of the non-empty bins."""
        keep = self.counts > 0
        return self.sums[keep] / self.counts[keep], self.counts[keep]

    def state(self) -> dict[str, torch.Tensor]:
        means, counts = self.points()
        return {"hist_means": means, "hist_counts": counts}


# rows of a float32 batch Gram added into the float64 sum at once (its float64 copy is this many rows)
ACCUMULATE_ROWS = 1024


def _gram(y: torch.Tensor) -> torch.Tensor:
    # one batch's Gram in float32 (a few thousand rows), the running sum in float64
    y = y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)
    return y.T @ y


class _Stat:
    """The running sums of one module's statistics at one layer."""

    def __init__(self, model, arch: ArchSpec, module: str, layer: int):
        self.module, self.layer = module, layer
        self.sums: dict[str, torch.Tensor] = {}
        self.hist: StreamingHistogram | None = None
        self.inputs: dict[str, torch.nn.Module] = {}
        self.outputs: dict[str, torch.nn.Module] = {}
        tag = f"{module}|{layer}|"
        if module == "mlp.down":
            self.inputs[tag + "k"] = arch.mlp_out_module(model, layer)
        elif module == "attn.v":
            arch.require(module, "attn_out")
            self.inputs[tag + "u"] = arch.sub(model, layer, arch.attn_out)
        elif module == "attn.qk":
            from ..hf.arch import attention_geometry, qkv_modules
            self.geom = attention_geometry(model, arch, layer)
            self.outputs.update({tag + w: m for w, m in qkv_modules(model, arch, layer).items()})
        elif module == "mlp.in":
            first = arch.sub(model, layer, arch.mlp_in[0])
            self.inputs[tag + "x"] = first
            self.outputs[tag + "pre"] = first
            self.hist = StreamingHistogram()
        else:
            raise ValueError(f"no statistics for module {module!r}")
        self.arch, self.tag = arch, tag

    def add(self, seen_in: dict, seen_out: dict, keep: torch.Tensor, take: int) -> None:
        def rows(t):
            return t.reshape(-1, t.shape[-1])[keep.to(t.device)][:take]

        def acc(name, y):
            g = _gram(y)
            if name not in self.sums:
                self.sums[name] = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
            total = self.sums[name]
            for i in range(0, g.shape[0], ACCUMULATE_ROWS):     # float64 copies of a block at a time
                total[i:i + ACCUMULATE_ROWS].add_(g[i:i + ACCUMULATE_ROWS])
        t = self.tag
        if self.module == "mlp.down":
            acc("C0", rows(seen_in[t + "k"][0]))
        elif self.module == "attn.v":
            acc("Cu", rows(seen_in[t + "u"][0]))
        elif self.module == "attn.qk":
            from ..hf.arch import split_qkv
            outs = split_qkv(self.arch, self.geom, {w: seen_out[t + w][0] for w in ("q", "k", "v", "qkv")
                                                    if t + w in seen_out})
            g = self.geom
            q = rows(outs["q"]).reshape(-1, g.n_kv, g.groups, g.head_dim).transpose(1, 2).reshape(-1, g.d_kv)
            acc("Cqk", rows(outs["k"]))
            acc("Cqk", q)
        elif self.module == "mlp.in":
            acc("Cx", rows(seen_in[t + "x"][0]))
            self.hist.add(rows(seen_out[t + "pre"][0]))

    def result(self, count: int) -> dict[str, torch.Tensor]:
        # divided in place: a second d×d float64 copy beside the sums would be the stage's peak
        out = {k: s.div_(count) for k, s in self.sums.items()}
        self.sums = {}
        if self.hist is not None:
            out.update(self.hist.state())
        return out


@torch.no_grad()
def compute_unit_statistics(model, tok, arch: ArchSpec, units: dict[str, list[int]], texts: list[str],
                            n_tokens: int, seq_len: int = 256, batch_size: int = 8,
                            progress: bool = True) -> tuple[dict[str, dict[int, dict[str, torch.Tensor]]], int]:
    """``{module: {layer: {name: tensor}}}`` over the first ``n_tokens`` tokens of ``texts`` for
    each module and its layers (see the module doc), in one forward pass per batch; and the count."""
    device = next(model.parameters()).device
    windows = _token_windows(tok, texts, n_tokens, seq_len)
    stats = [_Stat(model, arch, m, l) for m, layers in units.items() for l in layers]
    if not stats:
        return {}, 0
    inputs = {k: v for s in stats for k, v in s.inputs.items()}
    outputs = {k: v for s in stats for k, v in s.outputs.items()}
    deepest = arch.block(model, max(s.layer for s in stats))
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
        with capture_inputs(inputs) as seen_in, capture_outputs(outputs) as seen_out:
            run_until(model, deepest, input_ids=ids.to(device), attention_mask=mask.to(device))
        for s in stats:
            s.add(seen_in, seen_out, keep, take)
        count += take
        bar.update(take)
    bar.close()
    if count == 0:
        raise ValueError("statistics corpus produced no tokens")
    seconds = time.perf_counter() - t0
    log.info("key statistics: %d tokens in %.1f s (%.0f tokens/s), %s", count, seconds,
             count / max(seconds, 1e-9), units)
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for s in stats:
        out.setdefault(s.module, {})[s.layer] = s.result(count)
    return out, count


@torch.no_grad()
def compute_second_moments(model, tok, arch: ArchSpec, layers: list[int], texts: list[str],
                           n_tokens: int, seq_len: int = 256, batch_size: int = 8,
                           progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """``{layer: E[k kᵀ]}`` (float64) over the first ``n_tokens`` tokens, and the count used."""
    stats, count = compute_unit_statistics(model, tok, arch, {"mlp.down": list(layers)}, texts, n_tokens,
                                           seq_len, batch_size, progress)
    return {l: s["C0"] for l, s in stats.get("mlp.down", {}).items()}, count


# the statistic each module's cache files are named by ("C0" as it always was)
STAT_KIND = {"mlp.down": "C0", "attn.v": "Cu", "attn.qk": "Cqk", "mlp.in": "Cx"}


def unit_statistics(model, tok, arch: ArchSpec, units: dict[str, list[int]],
                    corpus: str | os.PathLike | Iterable[str], n_tokens: int = 100_000,
                    seq_len: int = 256, batch_size: int = 8, cache_dir: str | os.PathLike | None = None,
                    progress: bool = True,
                    fingerprint: str | None = None) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """The statistics of each (module, layer), from the disk cache when its key matches, else all
    the missing ones computed in one pass and cached."""
    texts = read_corpus(corpus)
    chash = corpus_hash(texts)
    fingerprint = fingerprint or model_fingerprint(model)
    cache = default_cache_dir_for(cache_dir)
    device = next(model.parameters()).device
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {m: {} for m in units}
    missing: dict[str, list[int]] = {}
    for m, layers in units.items():
        for l in layers:
            meta = _cache_meta(fingerprint, l, chash, n_tokens, seq_len, STAT_KIND[m])
            found = _load_cached(cache / _cache_name(meta), meta, whole=True)
            if found is None:
                missing.setdefault(m, []).append(l)
            else:
                out[m][l] = {k: v.to(device) for k, v in found.items()}
    if missing:
        computed, count = compute_unit_statistics(model, tok, arch, missing, texts, n_tokens, seq_len,
                                                  batch_size, progress)
        cache.mkdir(parents=True, exist_ok=True)
        for m, per_layer in computed.items():
            for l, st in per_layer.items():
                meta = _cache_meta(fingerprint, l, chash, n_tokens, seq_len, STAT_KIND[m])
                meta["tokens_used"] = str(count)
                save_file({k: v.cpu().contiguous() for k, v in st.items()}, str(cache / _cache_name(meta)),
                          metadata=meta)
                out[m][l] = st
    return out


def key_second_moments(model, tok, arch: ArchSpec, layers: list[int],
                       corpus: str | os.PathLike | Iterable[str], n_tokens: int = 100_000,
                       seq_len: int = 256, batch_size: int = 8, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, fingerprint: str | None = None,
                       used: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
    """``C0`` for each layer, from the disk cache when its key matches, else computed and cached
    (the same files ``unit_statistics`` reads and writes for "mlp.down").  ``used``, when given, gets
    the number of corpus tokens behind each layer's C0 (fewer than ``n_tokens`` for a short corpus)."""
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
            if used is not None:
                used[l] = _stored_tokens_used(path, n_tokens)
    if missing:
        computed, count = compute_second_moments(model, tok, arch, missing, texts, n_tokens, seq_len,
                                                 batch_size, progress)
        cache.mkdir(parents=True, exist_ok=True)
        for l, c0 in computed.items():
            meta = _cache_meta(fingerprint, l, chash, n_tokens, seq_len)
            meta["tokens_used"] = str(count)
            save_file({"C0": c0.cpu().contiguous()}, str(cache / _cache_name(meta)), metadata=meta)
            out[l] = c0
            if used is not None:
                used[l] = int(count)
    return out


def _stored_tokens_used(path: Path, n_tokens: int) -> int:
    """The token count a cached C0 records (files written before it was recorded: ``n_tokens``)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("tokens_used", n_tokens))


def _cache_meta(fingerprint: str, layer: int, chash: str, n_tokens: int, seq_len: int,
                kind: str = "C0") -> dict[str, str]:
    fmt = CACHE_FORMAT if kind == "C0" else f"mose_fast.{kind}.v1"
    return {"format": fmt, "model": fingerprint, "layer": str(layer), "corpus": chash,
            "n_tokens": str(n_tokens), "seq_len": str(seq_len)}


def _cache_name(meta: dict[str, str]) -> str:
    key = "|".join(meta[k] for k in ("format", "model", "layer", "corpus", "n_tokens", "seq_len"))
    kind = meta["format"].split(".")[1]
    return f"{kind}_L{meta['layer']}_{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _load_cached(path: Path, meta: dict[str, str], whole: bool = False):
    """The cached C0 (``whole``: every tensor of the file, by name), or None."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        if any(stored.get(k) != v for k, v in meta.items()):
            log.warning("statistics cache %s does not match this model/corpus/count; recomputing", path)
            return None
        tensors = load_file(str(path))
        return tensors if whole else tensors["C0"]
    except Exception as e:  # a truncated or foreign file is recomputed, not trusted
        log.warning("statistics cache %s unreadable (%s); recomputing", path, e)
        return None

"""The prefix cache of the target optimisation (``targets.py``): each Adam step runs only the prompts'
suffixes, from the last edited block on, against a key/value cache of their prefixes (:class:`PrefixCache`),
checked against a full forward when first built on a model; rows' suffixes share packed rows where that
saves tokens (:class:`_Packing`).  ``naive.py`` is the computation written without any of this.
"""
from __future__ import annotations

import copy
import logging
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from ..hf.arch import ArchSpec
from ..hf.hooks import _hidden, edit_output, output_kind, relative_difference, replaying, run_until
from ..hf.tokens import pad_batch, subject_last_index, target_ids
from ..requests import EditRequest

log = logging.getLogger(__name__)

# the prompt of the KL term, MEMIT's: the subject's next-token distribution held near the unedited one
KL_TEMPLATE = "{} is a"


def prefix_cache_tolerance(dtype: torch.dtype) -> float:
    """Largest relative logit difference between the cached and the full forward accepted as the
    same computation: rounding in the model's dtype (a wrong cache is off by O(1))."""
    return {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-3)


# model → (dtype, usable, replays, packs): the checks of PrefixCache, made at its first build on a
# model (they depend on how the family computes a forward, not on its weights or prompts); packs is
# None until a build had rows to pack
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Packed steps (see _Packing): used when they compute at most this share of the padded batch's tokens,
# with at most this many rows' suffixes in one packed row
PACK_GAIN = 0.85
PACK_MAX_SEGMENTS = 4


def pack_rows(lengths: list[int], width: int, max_segments: int = PACK_MAX_SEGMENTS) -> list[list[int]]:
    """First-fit decreasing: the indices of ``lengths`` in bins of total length ≤ ``width`` and at
    most ``max_segments`` entries (each length ≤ width)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, members in enumerate(bins):
            if room[b] >= lengths[i] and len(members) < max_segments:
                members.append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(width - lengths[i])
    return bins


def choose_packing(lengths: list[int]) -> tuple[int, list[list[int]]]:
    """(width, bins) with the fewest tokens, bins × width, over widths from the longest length to twice it."""
    longest = max(lengths)
    best = None
    for width in range(longest, 2 * longest + 1):
        bins = pack_rows(lengths, width)
        if best is None or len(bins) * width < len(best[1]) * best[0]:
            best = (width, bins)
    return best


@dataclass
class _Packing:
    """Several rows' suffixes run as one row: a step's cost is its tokens, and right-padding the
    suffixes to the longest wastes a third to a half of them (KL prompts are 3 tokens, rewrite
    prompts 3–8).  Packed row j holds the suffixes of its rows one after another; its cache holds
    the real positions of their prefixes one after another (padding left out); a 4-D attention mask lets each
    token see its own row's prefix and the tokens of its own suffix up to itself, and the position
    ids are each row's own — so every token computes what it computes unpacked."""
    ids: torch.Tensor           # J × width
    positions: torch.Tensor     # J × width
    allowed: torch.Tensor       # J × 1 × width × (m·P + width), bool
    cache: object               # the prefix cache in the packed layout
    replay: torch.Tensor | None  # J × width × d: block `layer`'s recorded output, packed
    start_row: torch.Tensor     # per current row: its packed row and the column its suffix starts at
    start_col: torch.Tensor
    sel_rows: torch.Tensor      # the selected positions, packed
    sel_cols: torch.Tensor

    def mask(self, model) -> torch.Tensor:
        return attention_mask_4d(self.allowed, model)


def _takes_4d_masks(model) -> bool:
    """Whether the model's attention is one that ``attention_mask_4d`` makes masks for (eager, SDPA)."""
    return getattr(model.config, "_attn_implementation", None) in (None, "eager", "sdpa")


def attention_mask_4d(allowed: torch.Tensor, model) -> torch.Tensor:
    """A 4-D mask (True: attend) as the model's attention takes it: boolean for SDPA, additive
    (0 / the dtype's min, float64 for a float64 model, else float32) for eager."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return allowed
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_layout(lengths: list[int], device, force: bool = False
                  ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sequences of ``lengths`` packed by ``choose_packing`` (``force``: in rows twice the longest,
    so that any two share one): (m, the most sequences in one packed row; the slot of each packed
    token, J × width, -1 for padding; per packed token the sequence and the position in it it holds,
    ``len(lengths)`` and 0 for padding; per packed row the sequence in each slot, J × m,
    ``len(lengths)`` for an empty slot)."""
    n = len(lengths)
    if force:
        width = 2 * max(lengths)
        bins = pack_rows(lengths, width)
    else:
        width, bins = choose_packing(lengths)
    J, m = len(bins), max(len(members) for members in bins)
    slot_row = torch.full((J, m), n, dtype=torch.long)
    seg = torch.full((J, width), -1, dtype=torch.long)
    src_row = torch.full((J, width), n, dtype=torch.long)
    src_col = torch.zeros((J, width), dtype=torch.long)
    for j, members in enumerate(bins):
        off = 0
        for slot, i in enumerate(members):
            L = lengths[i]
            slot_row[j, slot] = i
            seg[j, off:off + L] = slot
            src_row[j, off:off + L] = i
            src_col[j, off:off + L] = torch.arange(L)
            off += L
    return m, seg.to(device), src_row.to(device), src_col.to(device), slot_row.to(device)


def _packable(cache, longest: int) -> bool:
    """Whether ``cache``'s layers are plain key/value tensors that keep ``longest`` positions (a
    sliding-window layer that would crop them is not)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        isinstance(getattr(l, "keys", None), torch.Tensor) and l.keys.ndim == 4
        and (not getattr(l, "sliding_window", None) or l.sliding_window > longest)
        for l in layers)


def _set_kv(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put ``keys``/``values`` in a cache layer (with a sliding-window layer's count of positions seen)."""
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = keys.shape[-2]


def causal_within_segments(seg: torch.Tensor) -> torch.Tensor:
    """J × width × width: token t sees token t' ≤ t of its own segment (padding sees padding)."""
    t = torch.arange(seg.shape[1], device=seg.device)
    return (seg[:, :, None] == seg[:, None, :]) & (t[None, None, :] <= t[None, :, None])


def _adding_at(rows: torch.Tensor, cols: torch.Tensor, add: torch.Tensor):
    """An edit of a block's output (``edit_output``) adding ``add[i]`` at position (rows[i], cols[i])
    of its hidden state, out of place (δ's gradient flows through it)."""
    def bump(hidden: torch.Tensor) -> torch.Tensor:
        index = (rows.to(hidden.device), cols.to(hidden.device))
        return hidden.index_put(index, add.to(hidden.device, hidden.dtype), accumulate=True)
    return bump


class PromptRows:
    """The rows of every request: its rewrite prompts (context + prompt + target[:-1]) and its KL
    prompt, with the positions the loss reads."""

    def __init__(self, tok, requests: list[EditRequest], context_templates: list[list[str]]):
        flat = [t for group in context_templates for t in group]
        self.ids, self.lookup, self.row_request = [], [], []
        self.sel_rows, self.sel_cols, self.labels = [], [], []
        self.targets, self.n_rewrite = [], len(flat)
        for j, req in enumerate(requests):
            tgt = target_ids(tok, req.target_new)
            self.targets.append(tgt)
            for t in flat:
                i, p = subject_last_index(tok, t.replace("{}", req.template, 1), req.subject)
                row = len(self.ids)
                self.ids.append(i + tgt[:-1])
                self.lookup.append(p)
                self.row_request.append(j)
                end = len(self.ids[row])
                self.sel_rows += [row] * len(tgt)
                self.sel_cols += list(range(end - len(tgt), end))     # logits at c predict token c + 1
                self.labels += tgt
            i, p = subject_last_index(tok, KL_TEMPLATE, req.subject)
            row = len(self.ids)
            self.ids.append(i)
            self.lookup.append(p)
            self.row_request.append(j)
            self.sel_rows.append(row)
            self.sel_cols.append(p)
            self.labels.append(-1)
        self.n = len(requests)

    def rows_of(self, requests: list[int]) -> list[int]:
        keep = set(requests)
        return [r for r, j in enumerate(self.row_request) if j in keep]


def _fork(cache):
    """A cache that shares the prefix tensors but not their bookkeeping: a forward appends to its
    layers by concatenation (new tensors), so the original prefix stays as it was."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


class PrefixCache:
    """Runs each optimisation step on the prompts' *suffixes* only, from block ``layer`` on.

    δ enters at the subject's last token (row r's position ``lookup[r]``), and attention is causal,
    so no position before it depends on δ.  Each prompt's prefix ``ids[r][:lookup[r]]`` is run once
    (left-padded, no grad) into a key/value cache; every step then feeds only the suffixes (a few
    tokens instead of the whole templated prompt, right-padded) with δ added at their first position
    after block ``layer``.

    Blocks ``0 .. layer`` do not depend on δ on the suffixes either: their output is recorded once
    at δ = 0, and during a step those blocks return it (blocks before ``layer`` pass their input
    through) instead of computing it.  δ is added to the replayed output by the same hook as
    before, so the blocks after ``layer`` and the gradient see exactly what a full computation
    gives them.

    The first build on a model (and dtype) checks the cached logits at δ = 0 against a full forward
    at every selected position, and the replayed forward against the computed one; a family whose
    cached forward does not reproduce the logits (beyond rounding in the model's dtype) falls back
    to full forwards (``usable`` False), one whose replay does not runs every block (``replays``
    False).  Later builds on that model skip the checks: the prefix forward and blocks 0 .. layer
    of the suffixes at δ = 0 are all they run.  h₀ is read off the recorded output.

    ``select(requests)`` drops the rows of every other request (those that stopped early)."""

    def __init__(self, model, arch: ArchSpec, layer: int, batch: PromptRows, tok,
                 low_weights: dict[str, torch.Tensor] | None = None):
        self.model, self.batch = model, batch
        self.block = arch.block(model, layer)
        self.skipped = [arch.block(model, k) for k in range(layer + 1)]
        self.upper = [arch.block(model, k) for k in range(layer + 1, arch.num_layers(model))]
        self.low_weights: dict[str, torch.Tensor] = {}     # the steps' weight copies, set once built
        self.lm_head = arch.get(model, arch.lm_head)
        self.lm_head_weight = f"{arch.lm_head}.weight"
        self.device = next(model.parameters()).device
        ids, lookup = batch.ids, batch.lookup
        n = len(ids)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        P = max(lookup)
        prefix = torch.full((n, P), self.pad, dtype=torch.long)
        prefix_mask = torch.zeros((n, P), dtype=torch.long)
        for i, (x, c) in enumerate(zip(ids, lookup)):
            if c:
                prefix[i, P - c:] = torch.tensor(x[:c])
                prefix_mask[i, P - c:] = 1
        self.prefix_mask = prefix_mask.to(self.device)          # by original row
        self._prefix = None
        if P:
            pre_pos = (prefix_mask.cumsum(1) - 1).clamp(min=0)
            self._prefix = dict(input_ids=prefix.to(self.device), attention_mask=self.prefix_mask,
                                position_ids=pre_pos.to(self.device), use_cache=True)
        dtype = next(model.parameters()).dtype
        known = _CHECKED.get(model)
        known = known[1:] if known is not None and known[0] == dtype else None
        self._packed, self.packs = None, False
        # low-precision steps run on bf16 copies of the weights above the layer (low_precision_weights)
        # and read the prefix's keys and values above the layer: those blocks run in that precision
        # here too (the blocks up to the layer, which the record reads, stay exact); the checks of a
        # first build need the exact cache, and get the mixed one after them
        low = (low_weights or {}) if self.upper else {}
        checked = known is not None
        self.base_cache = self._prefix_cache(low if checked and known[0] else None, packed=checked and bool(known[2]))
        self._cache_exact = not (low and checked and known[0])
        self.cache = self.base_cache
        self.replay = self.replay_now = None      # block `layer`'s output at δ = 0: all rows / current rows
        self.replays, self._output_kinds = False, {}
        self.rows = torch.arange(n)
        self._layout()
        self.full = pad_batch(tok, ids, self.device)
        h_full = None
        with torch.no_grad():
            # the cached forward at δ = 0 records block `layer`'s output (the replay, and h0 at its
            # first suffix position: the subject's last token); it runs the blocks above only to be
            # checked against the full forward
            computed = self._cached_forward(None, "record" if known is None else "record-only")
            can_replay = all(self._output_kinds.get(k) is not None for k in range(len(self.skipped)))
            if known is None or not known[0]:
                ref, h_full = self._reference_forward(lookup)
            if known is None:
                replayed = self._cached_forward(None, "replay").float() if can_replay else None
                tol = prefix_cache_tolerance(dtype)
                usable = bool(relative_difference(computed.float(), ref) < tol)
                known = (usable, bool(usable and replayed is not None
                                      and relative_difference(replayed, computed.float()) < tol),
                         None)
            self.usable = known[0]
            self.replays = known[1] and can_replay
            if self.usable and known[2] is None:
                known = (*known[:2], self._check_packing(prefix_cache_tolerance(dtype)))
            _CHECKED[model] = (dtype, *known)
        self.packs = bool(known[2])
        repack = self.packs and self._prefix is not None and self._packed_prefix() is not None
        if self.usable and not checked and (low or repack):
            # a first build ends as every later build starts: the prefixes run as the steps read them
            # (packed, and in the steps' precision above the layer) and block `layer` recorded from
            # that cache, so an edit does not depend on whether its build was a model's first
            self.base_cache = self.cache = self._prefix_cache(low or None, packed=self.packs)
            self._cache_exact = not low
            self._packed = None
            if repack:
                with torch.no_grad():
                    self._cached_forward(None, "record-only")
        self.h0 = self.replay[:, 0].detach().clone() if self.usable else h_full
        self.low_weights = dict(low_weights or {})

    def _check_packing(self, tol: float) -> bool | None:
        """Whether packed steps give the unpacked logits (at a δ ≠ 0, so the δ positions are checked
        too) and packed prefixes the unpacked keys and values (against an exact prefix forward); None
        where these rows give nothing to pack (fewer than two rows, or fewer than two with a prefix):
        a later build checks.  A model that rejects the 4-D masks is not packed."""
        packing = self._build_packing(force=True)
        built = self._packed_prefix(force=True)
        if packing is None or built is None:
            return None
        g = torch.Generator().manual_seed(0)
        h = self.replay[:, 0].float()
        noise = torch.randn(self.batch.n, h.shape[1], generator=g).to(h.device)
        delta = (0.5 * h.norm(dim=1, keepdim=True).mean() / h.shape[1] ** 0.5 * noise).to(self.device)
        try:
            plain = self._cached_forward(delta, packing=None).float()
            packed = self._cached_forward(delta, packing=packing).float()
            if not relative_difference(packed, plain) < tol:
                return False
            exact = self.base_cache if self._cache_exact else self._run_prefix(self._prefix, None)
            unpacked = self._run_prefix(*built[:1], None)
        except Exception as err:         # noqa: BLE001 — any failure of the packed forward means "do not pack"
            log.warning("packed target steps not used for this model: %s", err)
            return False
        seen = self.prefix_mask.bool()[:, None, :, None]
        for mine, ref in zip(unpacked.layers, exact.layers):
            for a, b in ((built[1](mine.keys), ref.keys), (built[1](mine.values), ref.values)):
                if not relative_difference(a * seen, b.to(a.dtype) * seen) < tol:
                    return False
        return True

    def _packing(self) -> "_Packing | None":
        """The current rows' packing, where packed steps were verified and save enough tokens."""
        if not self.packs or self.cache is None:
            return None
        if self._packed is None:
            self._packed = self._build_packing(force=False) or False
        return self._packed or None

    def _build_packing(self, force: bool) -> "_Packing | None":
        """Pack the current rows (``choose_packing``); None where that saves too little (unless
        ``force``: then None only where no packed row holds two rows) or the cache is not one of plain
        key/value tensors per layer."""
        if self.cache is None or not _takes_4d_masks(self.model):
            return None
        P = self.prefix_mask.shape[1]
        if not _packable(self.cache, PACK_MAX_SEGMENTS * P + 2 * self.suffix.shape[1]) \
                or any(l.keys.shape[-2] != P for l in self.cache.layers):
            return None
        b, rows = self.batch, self.rows.tolist()
        n, S = len(rows), self.suffix.shape[1]
        lengths = [len(b.ids[r]) - b.lookup[r] for r in rows]
        m, seg, src_row, src_col, slot_row = packed_layout(lengths, self.device, force)
        J, width = seg.shape
        if m == 1 or (not force and J * width > PACK_GAIN * n * S):
            return None
        start_row = torch.zeros(n, dtype=torch.long, device=self.device)
        start_col = torch.zeros(n, dtype=torch.long, device=self.device)
        first = (src_col == 0) & (src_row < n)
        start_row[src_row[first]] = first.nonzero()[:, 0]
        start_col[src_row[first]] = first.nonzero()[:, 1]
        dev = self.device
        real = src_row < n
        ids = torch.where(real, torch.cat([self.suffix, self.suffix[:1]])[src_row, src_col], self.pad)
        positions = torch.where(real, torch.cat([self.positions, self.positions[:1]])[src_row, src_col], 0)
        # the prefixes' real columns of each packed row's rows, one after another (padding left out)
        pre = [[(i, col) for slot, i in enumerate(slot_row[j].tolist()) if i < n
                for col in range(P - b.lookup[rows[i]], P)] for j in range(J)]
        K = max(1, max(len(x) for x in pre))
        key_row = torch.full((J, K), n, dtype=torch.long)
        key_col = torch.zeros((J, K), dtype=torch.long)
        key_slot = torch.full((J, K), -2, dtype=torch.long)
        slot_of = {i: slot for j in range(J) for slot, i in enumerate(slot_row[j].tolist()) if i < n}
        for j, cols in enumerate(pre):
            for k, (i, col) in enumerate(cols):
                key_row[j, k], key_col[j, k], key_slot[j, k] = i, col, slot_of[i]
        key_row, key_col, key_slot = key_row.to(dev), key_col.to(dev), key_slot.to(dev)
        see_prefix = seg[:, :, None] == key_slot[:, None, :]                            # J × width × K
        allowed = torch.cat([see_prefix, causal_within_segments(seg)], 2)[:, None]

        def packed(x):          # n × kvh × P × hd per current row → J × kvh × K × hd
            x = torch.cat([x, torch.zeros_like(x[:1])]).transpose(1, 2)[key_row, key_col]   # J × K × kvh × hd
            return x.transpose(1, 2).contiguous()
        cache = _fork(self.cache)
        for layer in cache.layers:
            _set_kv(layer, packed(layer.keys), packed(layer.values))
        replay = None
        if self.replay_now is not None:
            rec = self.replay_now[:, :S]
            replay = torch.cat([rec, torch.zeros_like(rec[:1])])[src_row, src_col]
        sel_local = self.sel_rows_local
        return _Packing(ids=ids, positions=positions, allowed=allowed, cache=cache, replay=replay,
                        start_row=start_row, start_col=start_col, sel_rows=start_row[sel_local],
                        sel_cols=start_col[sel_local] + self.sel_cols_suffix)

    @torch.no_grad()
    def _prefix_cache(self, low: dict[str, torch.Tensor] | None, packed: bool = False):
        """Key/value cache of the prefixes (lm_head at no position: only the cache is wanted); with
        ``low`` (bf16 weight copies) the blocks above the layer run under autocast on them.  ``packed``:
        the prefixes run packed (``packed_layout``: several in one row, a 4-D mask) where that saves
        enough tokens, and their keys and values are put back in the rows' left-padded layout."""
        if self._prefix is None:
            return None
        inputs, unpack = self._prefix, None
        if packed:
            inputs, unpack = self._packed_prefix() or (inputs, None)
        cache = self._run_prefix(inputs, low)
        if unpack is not None:
            if not _packable(cache, 2 * self.prefix_mask.shape[1] + 2 * max(len(x) for x in self.batch.ids)):
                return self._run_prefix(self._prefix, low)
            for layer in cache.layers:
                _set_kv(layer, unpack(layer.keys), unpack(layer.values))
        return cache

    def _packed_prefix(self, force: bool = False):
        """(inputs, unpack) of the packed prefix forward, or None where packing saves too little
        (``force``: where no two prefixes share a packed row)."""
        lookup = self.batch.lookup
        have = [r for r, c in enumerate(lookup) if c]
        n, P = len(lookup), self.prefix_mask.shape[1]
        if not have or not _takes_4d_masks(self.model):
            return None
        m, seg, src_row, src_col, _ = packed_layout([lookup[r] for r in have], self.device, force)
        J, width = seg.shape
        if m == 1 or (not force and J * width > PACK_GAIN * n * P):
            return None
        dev = self.device
        row_of = torch.tensor(have + [0], device=dev)[src_row]                  # the row each packed token holds
        c = torch.tensor([lookup[r] for r in have] + [0], device=dev)[src_row]
        real = seg >= 0
        ids = torch.where(real, self._prefix["input_ids"][row_of, (P - c + src_col).clamp(max=P - 1)], self.pad)
        inputs = dict(input_ids=ids, attention_mask=attention_mask_4d(causal_within_segments(seg)[:, None], self.model),
                      position_ids=torch.where(real, src_col, 0), use_cache=True)
        # row r, prefix column p ← packed (j, t); column P − c_r + k of row r holds its token k
        flat = torch.full((n, P), J * width, dtype=torch.long, device=dev)      # J·width: a zero slot
        tok_index = torch.arange(J * width, device=dev).view(J, width)
        flat[row_of[real], (P - c + src_col)[real]] = tok_index[real]

        def unpack(x):          # J × kvh × width × hd → n × kvh × P × hd
            x = x.transpose(1, 2).reshape(J * width, x.shape[1], x.shape[-1])
            x = torch.cat([x, torch.zeros_like(x[:1])])[flat]                     # n × P × kvh × hd
            return x.transpose(1, 2).contiguous()
        return inputs, unpack

    def _run_prefix(self, inputs: dict, low: dict[str, torch.Tensor] | None):
        hooks = [self.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][:, :0],))]
        state = {}
        if low:
            autocast = torch.autocast(self.device.type, dtype=low[self.lm_head_weight].dtype)

            def enter(*_):
                autocast.__enter__()
                state["on"] = True

            def leave(*_):
                if state.pop("on", False):
                    autocast.__exit__(None, None, None)
            hooks += [self.upper[0].register_forward_pre_hook(enter), self.upper[-1].register_forward_hook(leave)]
        try:
            if not low:
                return self.model(**inputs).cache
            blocks = {k: w for k, w in low.items() if k != self.lm_head_weight}  # lm_head runs outside autocast
            return torch.func.functional_call(self.model, blocks, args=(), kwargs=inputs, tie_weights=False).cache
        finally:
            if state.pop("on", False):
                autocast.__exit__(None, None, None)
            for h in hooks:
                h.remove()

    def _reference_forward(self, lookup: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the selected positions from a full forward of every row at δ = 0, and the
        residual after block ``layer`` at each row's subject position."""
        seen = {}
        n = len(lookup)
        lookup_t = torch.tensor(lookup, device=self.device)

        def grab(hidden):
            seen["h"] = hidden[torch.arange(n, device=hidden.device), lookup_t.to(hidden.device)].detach()
            return hidden
        with self._selected_logits(self.sel_cols_full), edit_output(self.block, grab):
            ref = self.model(**self.full, use_cache=False).logits.float()
        return ref, seen["h"].to(self.device)

    def _layout(self) -> None:
        """Suffix tensors, positions and loss positions for the rows in ``self.rows``."""
        b = self.batch
        rows = self.rows.tolist()
        S = max(len(b.ids[r]) - b.lookup[r] for r in rows)
        suffix = torch.full((len(rows), S), self.pad, dtype=torch.long)
        suffix_mask = torch.zeros((len(rows), S), dtype=torch.long)
        for i, r in enumerate(rows):
            x, c = b.ids[r], b.lookup[r]
            suffix[i, :len(x) - c] = torch.tensor(x[c:])
            suffix_mask[i, :len(x) - c] = 1
        lookup_t = torch.tensor([b.lookup[r] for r in rows])
        self.suffix = suffix.to(self.device)
        self.mask = torch.cat([self.prefix_mask[self.rows.to(self.device)], suffix_mask.to(self.device)], 1)
        self.positions = (torch.arange(S).unsqueeze(0) + lookup_t.unsqueeze(1)).to(self.device)
        local = {r: i for i, r in enumerate(rows)}
        sel = [(local[r], c - b.lookup[r], lab, r) for r, c, lab in zip(b.sel_rows, b.sel_cols, b.labels) if r in local]
        self.sel_rows_local = torch.tensor([s[0] for s in sel], device=self.device)
        self.sel_cols_suffix = torch.tensor([s[1] for s in sel], device=self.device)
        self.sel_cols_full = torch.tensor([b.sel_cols[i] for i, r in enumerate(b.sel_rows) if r in local],
                                          device=self.device)
        self.row_request = torch.tensor([b.row_request[r] for r in rows], device=self.device)
        # per request: (positions of its target tokens in the selected logits, labels, its KL position)
        groups: dict[int, list] = {}
        for pos, (_, _, lab, r) in enumerate(sel):
            j = b.row_request[r]
            g = groups.setdefault(j, [[], [], None])
            if lab < 0:
                g[2] = pos
            else:
                g[0].append(pos)
                g[1].append(lab)
        self._positions = {j: (torch.tensor(p, device=self.device), torch.tensor(l, device=self.device), k)
                           for j, (p, l, k) in groups.items()}
        self._packed = None

    def loss_positions(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
        return self._positions

    def select(self, requests: list[int]) -> None:
        """Keep only the rows of ``requests`` (the cache and the replay are indexed from the rows
        they were made for, so they stay in the order of ``self.rows``)."""
        keep = self.batch.rows_of(requests)
        index = torch.tensor(keep, device=self.device)
        if self.base_cache is not None:
            self.cache = _fork(self.base_cache)
            self.cache.batch_select_indices(index)
        if self.replay is not None:
            self.replay_now = self.replay[index]
        self.rows = torch.tensor(keep)
        self._layout()

    def _cached_forward(self, delta: torch.Tensor | None, mode: str | None = None,
                        packing: "_Packing | None | bool" = True) -> torch.Tensor:
        """Logits at the selected positions.  ``mode``: "record" (compute every block and keep block
        ``layer``'s output), "record-only" (keep it and stop there: no logits), "replay",
        "compute"; default "replay" where the replay was verified.  ``packing``: True for the
        current rows' packing where there is one (steps), None for none, or a packing to use."""
        mode = mode or ("replay" if self.replays else "compute")
        if packing is True:
            packing = self._packing() if mode in ("replay", "compute") else None
        if packing is not None:
            return self._packed_forward(delta, mode, packing)
        cache = _fork(self.cache) if self.cache is not None else None
        handles = []
        try:
            replay = nullcontext()
            if mode in ("record", "record-only"):
                for k, block in enumerate(self.skipped):
                    def note(_m, _args, output, _k=k):
                        self._output_kinds[_k] = output_kind(output)
                    handles.append(block.register_forward_hook(note))

                def keep(_m, _args, output):
                    self.replay = self.replay_now = _hidden(output).detach()
                handles.append(self.block.register_forward_hook(keep))
            elif mode == "replay":
                kinds = [self._output_kinds[k] for k in range(len(self.skipped))]
                replay = replaying(self.skipped, kinds, self.replay_now[:, :self.suffix.shape[1]])
            n = len(self.row_request)
            bump = None if delta is None else _adding_at(torch.arange(n), torch.zeros(n, dtype=torch.long),
                                                         delta[self.row_request])
            inputs = dict(input_ids=self.suffix, attention_mask=self.mask, position_ids=self.positions,
                          cache=cache, use_cache=cache is not None)
            if mode == "record-only":
                run_until(self.model, self.block, **inputs)
                return None
            with replay, self._selected_logits(self.sel_cols_suffix), \
                    (edit_output(self.block, bump) if bump is not None else nullcontext()):
                out = self._step_call(inputs) if mode in ("replay", "compute") else self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        return out.logits

    def _packed_forward(self, delta: torch.Tensor | None, mode: str, packing: _Packing) -> torch.Tensor:
        """``_cached_forward`` in ``packing``'s layout (modes "replay" and "compute")."""
        replay = nullcontext()
        if mode == "replay":
            kinds = [self._output_kinds[k] for k in range(len(self.skipped))]
            replay = replaying(self.skipped, kinds, packing.replay)
        add = None if delta is None else delta[self.row_request]
        bump = None if add is None else _adding_at(packing.start_row, packing.start_col, add)
        inputs = dict(input_ids=packing.ids, attention_mask=packing.mask(self.model), position_ids=packing.positions,
                      cache=_fork(packing.cache), use_cache=True)
        with replay, self._selected_logits(packing.sel_cols, packing.sel_rows), \
                (edit_output(self.block, bump) if bump is not None else nullcontext()):
            return self._step_call(inputs).logits

    def _full_forward(self, delta: torch.Tensor) -> torch.Tensor:
        rows = self.rows.to(self.device)
        batch = {k: v[rows] for k, v in self.full.items()}
        lookup = torch.tensor([self.batch.lookup[r] for r in self.rows.tolist()], device=self.device)
        add = delta[self.row_request]
        bump = _adding_at(torch.arange(len(rows)), lookup, add)
        with self._selected_logits(self.sel_cols_full), edit_output(self.block, bump):
            return self._step_call({**batch, "use_cache": False}).logits

    def _step_call(self, inputs: dict):
        """The model on ``inputs``, with ``low_weights`` in place of its own where there are any."""
        if not self.low_weights:
            return self.model(**inputs)
        return torch.func.functional_call(self.model, self.low_weights, args=(), kwargs=inputs, tie_weights=False)

    @contextmanager
    def _selected_logits(self, cols: torch.Tensor, rows: torch.Tensor | None = None) -> Iterator[None]:
        """lm_head applied only at the selected positions (rows ``sel_rows_local`` or ``rows``, columns
        ``cols`` of the batch being run)."""
        rows = self.sel_rows_local if rows is None else rows
        handle = self.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][rows, cols],))
        try:
            yield
        finally:
            handle.remove()

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits at the selected positions of the current rows, δ_j added to request j's rows."""
        return self._cached_forward(delta) if self.usable else self._full_forward(delta)

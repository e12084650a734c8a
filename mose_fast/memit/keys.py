"""Keys ``K_E`` (MEMIT ``compute_ks``) and block outputs at the subject's last token.

A key is the input of the FFN output projection at the subject's last token, averaged over the
context templates: first within each group of templates, then across groups (so the bare
``"{}"`` group weighs as much as all generated prefixes together, as in MEMIT).

The other modules' keys (``unit_keys_and_outputs``) are averaged the same way: "attn.v" the
attention output projection's input u, "mlp.in" the FFN input x, "attn.qk" the pre-rotary query
and the Jacobian of the attention output with respect to it (``rules.mose_attn.attention_at``,
recomputed from the captured q/k/v and checked against the model's own attention output).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..hf.arch import ArchSpec, attention_geometry, qkv_modules, rotary_cos_sin, split_qkv
from ..hf.hooks import _hidden, capture_inputs, capture_outputs, output_kind, relative_difference, replaying, run_until
from ..hf.tokens import pad_batch, subject_last_index
from ..requests import EditRequest


@torch.no_grad()
def generate_context_templates(model, tok, prefixes=("The", "Therefore", "Because", "I", "You"),
                               length: int = 10, seed: int = 0) -> list[list[str]]:
    """``[["{}"], ["<generated text>. {}", ...]]``: ROME/MEMIT's templates, sampled with top-k 5
    from the model itself under a fixed seed, so the same model and seed give the same templates."""
    templates = ["{}"]
    if prefixes and length > 0:
        device = next(model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for prefix in prefixes:
            ids = torch.tensor([tok(prefix)["input_ids"]], device=device)
            for _ in range(length):   # top-k sampling by hand: reproducible with our own generator
                logits = model(input_ids=ids).logits[0, -1].float().cpu()
                top = logits.topk(5)
                pick = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
                ids = torch.cat([ids, pick.view(1, 1).to(device)], dim=1)
            text = tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            templates.append(text.strip() + ". {}")
    groups = [["{}"]]
    if len(templates) > 1:
        groups.append(templates[1:])
    return groups


def _subject_batch(tok, requests: list[EditRequest], templates: list[str]):
    """Every request in every template, cut after the subject's last token (attention is causal:
    nothing read at that token depends on the tokens after it), and that token's index."""
    ids, positions = [], []
    for req in requests:
        for t in templates:
            i, p = subject_last_index(tok, t.replace("{}", req.template, 1), req.subject)
            ids.append(i[:p + 1])
            positions.append(p)
    return ids, positions


class SubjectForward:
    """The forwards of one edit over the same prompts — every request in every context template,
    cut after the subject's last token — each starting at the first block an edit has changed
    since the previous forward.

    The edited layers are visited in order, so when the keys of layer l are read, blocks below the
    previous unit's layer are as they were at the previous forward: their outputs are recorded
    then, and the next forward replays them (:func:`hooks.replaying`) instead of computing them
    again.  The editor reports every change of a block's weights with ``edited(layer)``.

    Outputs wanted on the bare prompts only (the residual at the last edited layer, which the
    targets are compared with) are read by a forward of those rows alone, from the first block
    changed since they last ran (with records of their own): the other templates' rows (five in six)
    stop at the keys' layer.

    ``check``: the first replayed forward is also computed in full and the captures compared; a
    model whose blocks pass state other than the hidden state (so that a replay is not the same
    computation) then runs every forward in full (``replays`` False).

    **Patching an edited block.**  Where only a block's FFN output projection changes (an
    mlp.down edit), the block's output moves by exactly ``down(x) − y``, with x and y the
    projection's input and output at every position, captured when the block last ran
    (``run(..., patch=module)``).  ``patch(layer)`` after the edit writes the new recorded output
    from them — one d_out × d_in product per token instead of the whole block — and ``rewind(layer)``
    puts back the output recorded before the edit (a re-solve starts from the same weights).  The
    first patch on a model is compared with a computed block (``check_patch``); a family whose
    block output is not the projection's output plus something it does not change (beyond
    rounding) computes the block instead (``patches`` False).

    **Row chunks.**  The rows run sorted by length in chunks of at most ``chunk_rows``, each padded
    to its own longest row: on a CPU a forward of 600 rows of 22 tokens takes twice as long as six
    of 100 rows (cache-sized activations, a third less padding).  Records and captures are kept
    per chunk; what ``run`` returns is assembled in the rows' order, right-padded with zeros."""

    def __init__(self, model, tok, arch: ArchSpec, requests: list[EditRequest],
                 context_templates: list[list[str]], check: bool = True, chunk_rows: int | None = None):
        flat = [t for group in context_templates for t in group]
        self.model, self.arch, self.n_templates = model, arch, len(flat)
        self.ids, self.positions = _subject_batch(tok, requests, flat)
        device = next(model.parameters()).device
        chunk_rows = chunk_rows or CHUNK_ROWS.get(device.type, CHUNK_ROWS["cuda"])
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        self.chunks = [order[c:c + chunk_rows] for c in range(0, len(order), chunk_rows)]   # row indices
        self.chunk_inputs = [pad_batch(tok, [self.ids[i] for i in rows], device) for rows in self.chunks]
        self.width = max(len(x) for x in self.ids)
        self.bare = torch.arange(0, len(self.ids), self.n_templates)     # the bare prompts' rows
        # block k's output at its last computation, one tensor per chunk
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self._chunk_captures: dict[tuple[str, str], list[torch.Tensor]] = {}   # the last forward's, per chunk
        self.kinds: dict[int, int | None] = {}
        self.fresh = 0             # the outputs of blocks below this are recorded and current
        self.check, self.replays = check, True
        self.check_patch, self.patches = check, True
        # layer → (module, its input x, its output y, the block's recorded output) at the block's last
        # computation; kept for the first layer captured (``rewind``) and the latest one (``patch``)
        self._captured: dict[int, tuple] = {}
        # the bare prompts' rows alone, with records of their own (see ``_parts``)
        self._bare = (SubjectForward(model, tok, arch, requests, [["{}"]], check=False, chunk_rows=chunk_rows)
                      if len(flat) > 1 and flat[0] == "{}" else None)

    def edited(self, layer: int) -> None:
        """Block ``layer``'s weights changed: its output and every later one are stale."""
        self.fresh = min(self.fresh, layer)
        if self._bare is not None:
            self._bare.edited(layer)

    def run(self, first: int, stop: int, inputs_of: dict, outputs_of: dict, bare_of: dict | None = None,
            bare_stop: int | None = None, patch: torch.nn.Module | None = None) -> tuple[dict, dict]:
        """Forward through block ``stop``, computing at least blocks ``first`` .. ``stop`` (the ones
        holding the captured modules); returns the captured module inputs and hidden outputs, as
        :func:`hooks.capture_inputs` / :func:`hooks.capture_outputs` give them.  ``bare_of``: modules
        whose outputs are wanted on the bare prompts' rows only (in that order), in blocks up to
        ``bare_stop`` (≥ ``stop``; default ``stop``).  ``patch``: the module of block ``stop`` whose
        weights the caller changes next (its input and output are kept for ``patch``)."""
        bare_of = bare_of or {}
        bare_stop = stop if bare_stop is None else bare_stop
        if patch is not None:
            inputs_of, outputs_of = {**inputs_of, _PATCH: patch}, {**outputs_of, _PATCH: patch}
        self._chunk_captures = {}
        start = min(first, self.fresh) if self.replays else 0
        if start and any(self.kinds.get(k) is None for k in range(start)):
            start = 0
        got = self._parts(start, stop, inputs_of, outputs_of, bare_of, bare_stop)
        if start and self.check:
            self.check = False
            full = self._parts(0, stop, inputs_of, outputs_of, bare_of, bare_stop, replay_bare=False)
            same = all(relative_difference(got[i][name][0], full[i][name][0])
                       <= _REPLAY_TOLERANCE.get(full[i][name][0].dtype, 1e-3)
                       for i in (0, 1) for name in full[i])
            if not same:
                self.replays = False
                got = full
        if patch is not None:
            x, y = self._chunk_captures.get(("in", _PATCH)), self._chunk_captures.get(("out", _PATCH))
            if x is not None and y is not None and self.fresh > stop and self.kinds.get(stop) is not None:
                keep = min(self._captured, default=stop)
                self._captured = {k: v for k, v in self._captured.items() if k == keep}
                self._captured[stop] = (patch, x, y, self.outputs[stop])
        return got

    @torch.no_grad()
    def patch(self, layer: int) -> bool:
        """Block ``layer``'s captured module (and nothing else) has new weights, and the caller said so
        with ``edited(layer)``: its recorded output becomes ``before + module(x) − y`` and blocks
        through ``layer`` are current again.  False (nothing done: the block is computed at the
        next forward) where there is no capture of that layer, patching is off, or a block below
        it is stale."""
        cap = self._captured.get(layer)
        if cap is None or not (self.patches and self.replays) or self.fresh != layer:
            return False
        module, xs, ys, before = cap
        wide = torch.promote_types(before[0].dtype, torch.float32)     # bf16/fp16 records: added in float32
        patched = [(b.to(wide) + (module(x).to(wide) - y.to(wide))).to(b.dtype) for b, x, y in zip(before, xs, ys)]
        tolerance = _REPLAY_TOLERANCE.get(patched[0].dtype, 1e-3)

        def flat(chunks):
            return torch.cat([c.reshape(-1) for c in chunks])
        if self.check:                 # the replays are not verified yet: compare one now (as ``run`` would)
            self.check = False
            self._forward(layer, layer, {}, {})
            replayed = self.outputs[layer]
            self._forward(0, layer, {}, {})
            if relative_difference(flat(replayed), flat(self.outputs[layer])) > tolerance:
                self.replays = False
                return True            # the block was computed in full: blocks through `layer` are current
        if self.check_patch:           # once per model: against the block computed from its recorded input
            self.check_patch = False
            self._forward(layer, layer, {}, {})
            if relative_difference(flat(patched), flat(self.outputs[layer])) > tolerance:
                self.patches = False
                return True            # the block was computed: blocks through `layer` are current
        self.outputs[layer] = patched
        self.fresh = layer + 1
        return True

    def rewind(self, layer: int) -> bool:
        """The weights of block ``layer`` and every later block are back to what they were when
        ``layer`` was captured, and those below it never changed since (a re-solve of the same edit):
        its recorded output is the one captured then.  False (the block is computed again, as after
        ``edited(layer)``) without a capture of that layer."""
        self.edited(layer)
        cap = self._captured.get(layer)
        if cap is None or not (self.patches and self.replays) or self.fresh != layer:
            return False
        self.outputs[layer] = cap[3]
        self.fresh = layer + 1
        return True

    def _parts(self, start: int, stop: int, inputs_of: dict, outputs_of: dict, bare_of: dict, bare_stop: int,
               replay_bare: bool = True) -> tuple[dict, dict]:
        """Every row from block ``start`` through ``stop``; then the bare prompts' rows alone through
        ``bare_stop``, from the first block changed since they last ran (their own records replay the
        blocks below it, as for every row; from block 0 where ``replay_bare`` or replays are off)."""
        if bare_stop == stop or self._bare is None:     # one forward: the bare outputs read off its rows
            seen_in, seen_out = self._forward(start, bare_stop, inputs_of, {**outputs_of, **bare_of})
            for name in bare_of:
                seen_out[name] = [t[self.bare.to(t.device)] for t in seen_out[name]]
            return seen_in, seen_out
        seen_in, seen_out = self._forward(start, stop, inputs_of, outputs_of) if start <= stop else ({}, {})
        bare = self._bare
        first = min(bare.fresh, bare_stop) if replay_bare and self.replays else 0
        if first and any(bare.kinds.get(k) is None for k in range(first)):
            first = 0
        _, seen_bare = bare._forward(first, bare_stop, {}, bare_of)
        return seen_in, {**seen_out, **seen_bare}

    def _forward(self, start: int, stop: int, inputs_of: dict, outputs_of: dict) -> tuple[dict, dict]:
        """Blocks ``start`` .. ``stop`` on every chunk (the blocks below replayed from the records);
        the captures assembled over the rows (``_chunk_captures`` keeps them per chunk)."""
        blocks = [self.arch.block(self.model, k) for k in range(stop + 1)]
        n = len(self.chunks)
        records = {k: [None] * n for k in range(start, stop + 1)}
        per_chunk = {("in", name): [] for name in inputs_of} | {("out", name): [] for name in outputs_of}
        current = [0]
        handles = []
        for k in range(start, stop + 1):
            def note(_m, _args, output, _k=k):
                self.kinds[_k] = output_kind(output)
                records[_k][current[0]] = _hidden(output).detach()
            handles.append(blocks[k].register_forward_hook(note))
        try:
            for c in range(n):
                current[0] = c
                replay = replaying(blocks[:start], [self.kinds[k] for k in range(start)],
                                   self.outputs[start - 1][c]) if start else nullcontext()
                with replay, capture_inputs(inputs_of) as seen_in, capture_outputs(outputs_of) as seen_out:
                    run_until(self.model, blocks[stop], **self.chunk_inputs[c])
                for name in inputs_of:
                    per_chunk[("in", name)].append(seen_in[name][0])
                for name in outputs_of:
                    per_chunk[("out", name)].append(seen_out[name][0])
        finally:
            for h in handles:
                h.remove()
        self.outputs.update(records)
        self.fresh = stop + 1
        self._chunk_captures = per_chunk
        return ({name: [self._assemble(per_chunk[("in", name)])] for name in inputs_of if name != _PATCH},
                {name: [self._assemble(per_chunk[("out", name)])] for name in outputs_of if name != _PATCH})

    def _assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Per-chunk tensors (rows × the chunk's width × …) as one (all rows × the longest width × …)
        tensor in the rows' order, zero past each row's chunk width."""
        if len(pieces) == 1 and pieces[0].shape[1] == self.width and self.chunks[0] == list(range(len(self.ids))):
            return pieces[0]
        out = pieces[0].new_zeros((len(self.ids), self.width, *pieces[0].shape[2:]))
        for rows, piece in zip(self.chunks, pieces):
            out[torch.tensor(rows, device=out.device), :piece.shape[1]] = piece
        return out


_PATCH = "__patch__"       # the capture name of ``run(..., patch=module)``
# rows per chunk of a SubjectForward by device type (see its doc): cache-sized on a CPU, one chunk of
# every row (up to this many) on a GPU
CHUNK_ROWS = {"cpu": 96, "cuda": 4096}

# the replayed and the computed forward run the same operations on the same inputs; beyond rounding
# they are different computations
_REPLAY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def template_weights(context_templates: list[list[str]]) -> torch.Tensor:
    """Each template's weight in the mean key (float64, sums to 1): 1/(n_groups·len(group))."""
    return torch.cat([torch.full((len(g),), 1.0 / (len(context_templates) * len(g)), dtype=torch.float64)
                      for g in context_templates])


@torch.no_grad()
def compute_template_keys(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                          context_templates: list[list[str]]) -> torch.Tensor:
    """The key of every request in every template, (n_requests × n_templates × d_in) in the model's
    dtype, templates in the order of the flattened groups (weights: ``template_weights``)."""
    flat = [t for group in context_templates for t in group]
    ids, positions = _subject_batch(tok, requests, flat)
    device = next(model.parameters()).device
    module = arch.mlp_out_module(model, layer)
    with capture_inputs({"k": module}) as seen:
        run_until(model, arch.block(model, layer), **pad_batch(tok, ids, device))
    inputs = seen["k"][0]
    rows = inputs[torch.arange(len(ids), device=device), torch.tensor(positions, device=device)]
    return rows.view(len(requests), len(flat), -1)


@torch.no_grad()
def keys_and_outputs(model, tok, arch: ArchSpec, layer: int, out_layer: int, requests: list[EditRequest],
                     context_templates: list[list[str]], forward: SubjectForward | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over every request in every template (stopped after block ``out_layer``):
    ``(K_E, h)`` — MEMIT's mean key at ``layer`` (n × d_in) and the residual stream after block
    ``out_layer`` at the subject's last token of each bare prompt (n × d_model).

    The first template is the bare prompt ``"{}"`` (``generate_context_templates``), so its rows are
    exactly the prompts ``block_outputs_at_subject`` runs."""
    flat = [t for group in context_templates for t in group]
    if flat[0] != "{}":
        raise ValueError(f"the first context template must be the bare prompt '{{}}', got {flat[0]!r}")
    if out_layer < layer:
        raise ValueError(f"out_layer {out_layer} precedes the key layer {layer}")
    forward = forward or SubjectForward(model, tok, arch, requests, context_templates, check=False)
    ids, positions = forward.ids, forward.positions
    module = arch.mlp_out_module(model, layer)
    keys, outs = forward.run(layer, layer, {"k": module}, {}, bare_of={"h": arch.block(model, out_layer)},
                             bare_stop=out_layer, patch=module)
    k_in, h = keys["k"][0], outs["h"][0]
    rows = torch.arange(len(ids), device=k_in.device)
    cols = torch.tensor(positions, device=k_in.device)
    K = mean_key(k_in[rows, cols].view(len(requests), len(flat), -1), context_templates)
    return K, _at_bare_subjects(h, forward)


def _at_bare_subjects(h: torch.Tensor, forward: SubjectForward) -> torch.Tensor:
    """The bare prompts' rows of ``h`` (as ``SubjectForward.run`` returns ``bare_of`` outputs) at their
    subject's last token."""
    cols = torch.tensor(forward.positions, device=h.device)[forward.bare.to(h.device)]
    return h[torch.arange(len(cols), device=h.device), cols]


# the recomputed attention output may differ from the model's by rounding (the model's own attention
# may run in float32 or bf16); beyond this relative difference it is another computation
ATTENTION_MISMATCH_LIMIT = {torch.float64: 1e-6, torch.float32: 1e-3}


@torch.no_grad()
def unit_keys_and_outputs(model, tok, arch: ArchSpec, layer: int, module: str, out_layer: int,
                          requests: list[EditRequest], context_templates: list[list[str]],
                          forward: SubjectForward | None = None):
    """``keys_and_outputs`` for any module of ``MOSEConfig.modules``: (keys, h) from one forward over
    every request in every template, stopped after block ``out_layer``.  Keys: "mlp.down" the mean
    key (n × d_in), "attn.v" the mean o_proj input (n × d_q), "mlp.in" the mean FFN input
    (n × d_model), "attn.qk" a ``rules.mose_attn.QKKeys``."""
    if module == "mlp.down":
        return keys_and_outputs(model, tok, arch, layer, out_layer, requests, context_templates, forward)
    flat = [t for group in context_templates for t in group]
    if flat[0] != "{}":
        raise ValueError(f"the first context template must be the bare prompt '{{}}', got {flat[0]!r}")
    if out_layer < layer:
        raise ValueError(f"out_layer {out_layer} precedes the key layer {layer}")
    forward = forward or SubjectForward(model, tok, arch, requests, context_templates, check=False)
    ids, positions = forward.ids, forward.positions
    inputs, outputs = {}, {}
    if module in ("attn.v", "attn.qk"):
        arch.require(module, "attn_out")
        inputs["u"] = arch.sub(model, layer, arch.attn_out)
    if module == "attn.qk":
        outputs.update({"p." + w: m for w, m in qkv_modules(model, arch, layer).items()})
    elif module == "mlp.in":
        inputs["x"] = arch.sub(model, layer, arch.mlp_in[0])
    elif module != "attn.v":
        raise ValueError(f"unknown module {module!r}")
    seen_in, seen_out = forward.run(layer, layer, inputs, outputs, bare_of={"h": arch.block(model, out_layer)},
                                    bare_stop=out_layer)
    h_bare = _at_bare_subjects(seen_out.pop("h")[0], forward)
    n = len(requests)
    if module in ("attn.v", "mlp.in"):
        x = seen_in["u" if module == "attn.v" else "x"][0]
        rows = x[torch.arange(len(ids), device=x.device), torch.tensor(positions, device=x.device)]
        return mean_key(rows.view(n, len(flat), -1), context_templates), h_bare
    from ..rules.mose_attn import QKKeys, attention_at
    geom = attention_geometry(model, arch, layer)
    qkv = split_qkv(arch, geom, {w[2:]: seen_out[w][0] for w in seen_out if w.startswith("p.")})
    u = seen_in["u"][0]
    width = max(positions) + 1
    if geom.rot:
        cos, sin = rotary_cos_sin(model, arch, torch.arange(width))
    else:
        cos = sin = torch.zeros(width, 0, dtype=torch.float64)
    qs, Js, mismatch = [], [], 0.0
    for b, p in enumerate(positions):
        o, J = attention_at(qkv["q"][b, p].view(geom.n_heads, geom.head_dim),
                            qkv["k"][b, :p + 1].view(p + 1, geom.n_kv, geom.head_dim),
                            qkv["v"][b, :p + 1].view(p + 1, geom.n_kv, geom.head_dim),
                            cos.to(u.device), sin.to(u.device), geom)
        ref = u[b, p].to(torch.float64)
        mismatch = max(mismatch, float((o.reshape(-1) - ref).norm() / ref.norm().clamp_min(1e-30)))
        qs.append(qkv["q"][b, p].to(torch.float64))
        Js.append(J.reshape(-1))
    limit = ATTENTION_MISMATCH_LIMIT.get(u.dtype, 5e-2)
    if mismatch > 10 * limit:
        raise ValueError(f"attn.qk at layer {layer}: the recomputed attention output differs from the model's "
                         f"by {mismatch:.1e} (relative); this attention variant is not supported")
    q = mean_key(torch.stack(qs).view(n, len(flat), -1), context_templates)
    J = mean_key(torch.stack(Js).view(n, len(flat), -1), context_templates)
    return QKKeys(q=q.T.contiguous(), J=J.view(n, geom.n_heads, geom.head_dim, geom.head_dim),
                  mismatch=mismatch), h_bare


@torch.no_grad()
def compute_keys(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                 context_templates: list[list[str]]) -> torch.Tensor:
    """``K_E`` as an (n_requests × d_in) tensor in the model's dtype."""
    rows = compute_template_keys(model, tok, arch, layer, requests, context_templates)
    return mean_key(rows, context_templates)


def mean_key(rows: torch.Tensor, context_templates: list[list[str]]) -> torch.Tensor:
    """MEMIT's key from the per-template keys: the mean within each group, then across groups."""
    start, group_means = 0, []
    for group in context_templates:
        group_means.append(rows[:, start:start + len(group)].mean(1))
        start += len(group)
    return torch.stack(group_means, 1).mean(1)


@torch.no_grad()
def block_outputs_at_subject(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                             forward: SubjectForward | None = None) -> torch.Tensor:
    """Residual stream after block ``layer`` at the subject's last token of each bare prompt (read off
    ``forward``'s bare-prompt rows where given)."""
    if forward is not None:         # the bare prompts alone through block `layer`, from the record below it
        _, outs = forward.run(layer, layer - 1, {}, {}, bare_of={"h": arch.block(model, layer)}, bare_stop=layer)
        return _at_bare_subjects(outs["h"][0], forward)
    ids, positions = _subject_batch(tok, requests, ["{}"])
    device = next(model.parameters()).device
    block = arch.block(model, layer)
    with capture_outputs({"h": block}) as seen:
        run_until(model, block, **pad_batch(tok, ids, device))
    hidden = seen["h"][0]          # on the block's device (a model placed over several devices)
    return hidden[torch.arange(len(ids), device=hidden.device), torch.tensor(positions, device=hidden.device)]

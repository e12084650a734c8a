"""Memory plan of an editing job, from the model's config alone (a meta-device model: no weights).

Each stage of a job holds the model's weights and whatever that stage adds; the plan gives, per
stage, the bytes on the editing device (the GPU, or the CPU for a CPU job) with their parts, and
the host memory the all-or-nothing copies and the undo history take:

  weights     the parameters in their dtype
  statistics  + per edited layer the float64 sum of k·kᵀ, one float32 batch Gram, the batch's
              captured keys and the forward's activations (stopped after the deepest edited layer)
  prepare     + the rule state being built from C0 (the largest point: the last layer's C0 and its
              Cholesky factor beside every other layer's finished state)
  rule state  + the rule's state after N edits (and float32 masters of bf16/fp16 edited matrices)
  targets     + the batched target optimisation: the prefix key/value cache of every prompt row,
              the activations autograd keeps for the layers after the last edited one, the logits
  solve       + one layer's solve: float64 copies of W, C0⁻¹·Wᵀ, the Krylov basis or the dense M
  snapshot    host memory: the edited matrices before the edit, and the undo history's copies

On a GPU the editor keeps the rule state on the host (``mose_fast.offload``, MOSE_OFFLOAD_RULE_STATE):
the statistics are summed one layer at a time, each C0 waits on the host for its layer's prepare,
and only the layer being prepared, solved, committed or undone has its state on the device.  The
device stages then hold the weights, the float32 masters, one layer's state (the largest) where a
rule call runs, and the stage's working memory; the host holds every layer's state beside the copies.
On the CPU everything is one memory and every layer's state is counted in every stage.

The sizes are the tensors the code allocates (``rules/``, ``memit/``, ``editor.py``); activations
are estimated from the model's widths and the prompt lengths of a CounterFact edit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

GiB = 2 ** 30
# prompt lengths of a target optimisation row (CounterFact): context template + prompt prefix
# before the subject's last token, and the suffix from it to the end of the target
PREFIX_TOKENS, SUFFIX_TOKENS, TARGET_TOKENS = 24, 8, 3


@dataclass
class Stage:
    name: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    model: str
    preset: str
    layers: list[int]
    edits: int
    batch: int
    dtype: str
    device: str
    stages: list[Stage]
    host: Stage
    gpu_mem: float | None = None
    offload: bool = False       # rule state on the host, one layer's on the device at a time

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)

    def fits(self) -> bool | None:
        return None if self.gpu_mem is None else self.peak.total <= self.gpu_mem * GiB

    def to_dict(self) -> dict:
        return {"model": self.model, "preset": self.preset, "layers": self.layers, "edits": self.edits,
                "batch": self.batch, "dtype": self.dtype, "device": self.device,
                "stages": {s.name: {"total": s.total, "parts": s.parts} for s in self.stages},
                "host": {"total": self.host.total, "parts": self.host.parts},
                "peak_stage": self.peak.name, "peak_bytes": self.peak.total, "gpu_mem_gib": self.gpu_mem,
                "fits": self.fits(), "offload_rule_state": self.offload}

    def markdown(self) -> str:
        lines = [f"Memory plan: {self.model}, preset {self.preset!r}, layers {self.layers}, {self.edits} edits of "
                 f"memory, batch {self.batch}, {self.dtype} weights, on {self.device}", "",
                 "| stage | GiB | largest parts |", "|---|---|---|"]
        for s in self.stages + [self.host]:
            big = sorted(s.parts.items(), key=lambda kv: -kv[1])[:3]
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in big if v)
            lines.append(f"| {s.name} | {s.total / GiB:.2f} | {parts} |")
        lines.append("")
        verdict = "" if self.gpu_mem is None else (
            f"; fits {self.gpu_mem:g} GiB" if self.fits() else f"; does NOT fit {self.gpu_mem:g} GiB")
        lines.append(f"Peak: {self.peak.total / GiB:.2f} GiB at '{self.peak.name}'{verdict}.")
        if self.offload:
            lines.append(f"Rule state on the host ({self.host.total / GiB:.2f} GiB with the copies), one layer's on "
                         f"the device at a time (MOSE_OFFLOAD_RULE_STATE=0 keeps every layer's on the device; the "
                         f"editor's default keeps it there where that fits 90 % of the device).")
        elif self.device != "cpu":
            lines.append("Every layer's rule state on the device (it fits; MOSE_OFFLOAD_RULE_STATE=1 keeps it "
                         "on the host).")
        return "\n".join(lines)


def meta_model(config):
    """The model built on the meta device: shapes and parameter counts, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def load_config(model: str | Path):
    """A transformers config from a model directory, a config.json, a GGUF file or 'smollm2-135m'."""
    from transformers import AutoConfig

    from .hf.models import model_config
    path = Path(str(model))
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.from_pretrained(str(path.parent)) if path.name == "config.json" else \
            AutoConfig.for_model(**_read_json(path))
    return model_config(model)


def _read_json(path: Path) -> dict:
    import json
    d = json.loads(path.read_text())
    if "model_type" not in d:
        raise ValueError(f"{path}: a model config needs 'model_type'")
    return d


def offloads(device: str, offload: bool | None = None) -> bool | None:
    """Whether ``MOSEEditor`` keeps the rule state on the host for weights on ``device`` (its
    ``offload_rule_state`` argument, else MOSE_OFFLOAD_RULE_STATE); None for "auto" on a GPU: the
    editor offloads where the plan with the state resident does not fit the device (``plan``)."""
    if offload is not None:
        return bool(offload)
    from .backends import env_choice
    choice = env_choice("MOSE_OFFLOAD_RULE_STATE", "auto", ("auto", "0", "1"))
    if choice != "auto":
        return choice == "1"
    return None if str(device).startswith("cuda") else False


def plan(model: str | Path, cfg, edits: int = 1000, batch: int = 1, dtype: str = "bfloat16",
         device: str = "cuda", gpu_mem: float | None = None, config=None, offload: bool | None = None) -> Plan:
    """The memory plan of editing ``model`` with ``cfg`` (a MOSEConfig) after ``edits`` kept edits,
    ``batch`` requests per edit, ``dtype`` weights, on ``device`` ("cuda" or "cpu"); ``offload``:
    whether the rule state lives on the host (default: as the editor decides, see ``offloads``)."""
    from .hf.arch import resolve_arch
    from .rules import rule_class
    from .rules.mose_input import gram_by_change
    from .rules.rotation import resolve_polar_method
    from .solve.procrustes import SUBSPACE_METHODS
    config = config if config is not None else load_config(model)
    meta = meta_model(config)
    arch = resolve_arch(meta)
    cfg.validate_for_model(arch.num_layers(meta))
    s_w = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    n_params = sum(p.numel() for p in meta.parameters())
    shapes = {l: tuple(arch.weight_view(meta, l).shape) for l in cfg.layers}     # (d_out, d_in)
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    n_layers = arch.num_layers(meta)
    vocab = config.vocab_size
    weights = n_params * s_w
    low_precision = s_w < 4
    masters = sum(o * i * 4 for o, i in shapes.values()) if (low_precision and cfg.master_weights) else 0
    side = cfg.rule_hparams.get("side", "output") if cfg.method == "mose" else None
    n_keys = edits * 1          # one key column per request kept in the edit memory

    rule = rule_class(cfg.method, cfg.rule_hparams)

    def state_of(l: int) -> dict[str, int]:
        return rule.planned_state(*shapes[l], n_keys, cfg.rule_hparams)

    modules = [m for m in getattr(cfg, "modules", ("mlp.down",)) if m != "mlp.down"]
    d_q = heads * head_dim
    kv_dim_ = kv_heads * head_dim
    ffn_in_params = (2 if getattr(config, "model_type", "") in ("llama", "mistral", "qwen2") else 1) * hidden * inter
    module_state = {   # per layer: the retention Grams the other modules keep (float64)
        "attn.qk": {"attn.qk: C_qk (float64)": 8 * kv_dim_ * kv_dim_},
        "attn.v": {"attn.v: P of o_proj's input (float64)": 8 * d_q * d_q},
        "mlp.in": {"mlp.in: C_x and its Cholesky factor (float64)": 2 * 8 * hidden * hidden},
    }
    module_params = {"attn.qk": hidden * (d_q + kv_dim_), "attn.v": hidden * kv_dim_, "mlp.in": ffn_in_params}
    extra_params = sum(module_params[m] for m in modules) * len(cfg.layers)
    if low_precision and cfg.master_weights:
        masters += 4 * extra_params

    def summed(label: str, per_layer) -> dict[str, int]:
        out: dict[str, int] = {}
        for l in cfg.layers:
            for k, v in per_layer(l).items():
                out[f"{label}{k}"] = out.get(f"{label}{k}", 0) + v
        return out

    offload = offloads(device, offload)
    if offload is None:      # "auto", as the editor decides it: resident where that fits 90 % of the device
        if gpu_mem is None:
            offload = True   # the device's size unknown: the plan that fits the smaller cards
        else:
            resident = plan(model, cfg, edits, batch, dtype, device, gpu_mem, config, offload=False)
            offload = resident.peak.total > 0.9 * gpu_mem * GiB
    offload = offload and device != "cpu"
    # the editor sums C0 one layer at a time when it offloads and mlp.down is the only module (the
    # other modules' statistics come from one pass over every unit)
    per_layer_stats = offload and not modules

    def layer_total(l: int) -> int:
        """Bytes of one layer's rule state, every module's, after the edits."""
        return sum(state_of(l).values()) + sum(v for m in modules for v in module_state[m].values())
    big_layer = max(cfg.layers, key=layer_total)
    # --- statistics ---------------------------------------------------------------------------
    tokens = cfg.stats_batch_size * cfg.stats_seq_len
    d_ins = [shapes[l][1] for l in cfg.layers]
    summed_d = [max(d_ins)] if per_layer_stats else d_ins
    stats = Stage("statistics", {
        "weights": weights,
        ("C0 sum of one layer (float64)" if per_layer_stats else "C0 sums (float64)"): sum(8 * d * d for d in summed_d),
        "other modules' sums (float64)": len(cfg.layers) * sum(v // (2 if m == "mlp.in" else 1)
                                                               for m in modules for v in module_state[m].values()),
        "batch Gram (float32)": 4 * max(d_ins) * max(d_ins),
        "its float64 block being added": 8 * 1024 * max(d_ins),
        "captured keys": sum(tokens * d * s_w for d in summed_d) + tokens * max(d_ins) * 4,
        "forward activations": tokens * (4 * hidden + 3 * inter) * s_w
                               + cfg.stats_batch_size * heads * cfg.stats_seq_len ** 2 * 4,
    })
    # --- prepare: the last layer's C0 being factored beside the other layers' states ---------------
    last = cfg.layers[-1]
    d_last = shapes[last][1]
    others = {k: v for k, v in summed("", state_of).items()}
    prepare_parts = {"weights": weights, "masters": masters}
    if offload:
        # one layer at a time: its C0 copied from the host to the device, its state built there
        d_out_big, d_big = shapes[big_layer]
        built = sum(v for k, v in state_of(big_layer).items() if not k.startswith(("edit memory", "S =")))
        built += sum(v for m in modules for v in module_state[m].values())
        if cfg.method == "mose" and side == "input":
            # C0, then 0.5·(C0 + C0ᵀ) formed through two more float64 copies; then the Cholesky factor,
            # G and W·Wᵀ beside the symmetrised C0
            working = max(3 * 8 * d_big * d_big, 8 * d_big * d_big + built)
        elif cfg.method == "mose":       # P = W·C0·Wᵀ: C0, W and W·C0 in float64 beside P
            working = 8 * d_big * d_big + 2 * 8 * d_out_big * d_big + built
        else:                            # the additive rules keep the device copy of C0 as their state
            working = built
        prepare_parts["one layer: its C0 (float64) and its state being built"] = working
        if not per_layer_stats:          # C0 of every layer came to the device in one pass
            prepare_parts["C0 of the other layers (float64)"] = sum(8 * d * d for d in d_ins) - 8 * d_big * d_big
    elif cfg.method == "mose" and side == "input":
        # prepare builds the Cholesky factor, G and W·Wᵀ; S and the memory come with the edits
        def built(l):
            return sum(v for k, v in state_of(l).items() if not k.startswith(("edit memory", "S =")))
        prepare_parts["rule state (other layers)"] = sum(built(l) for l in cfg.layers if l != last)
        prepare_parts["C0 of the layer (float64)"] = 8 * d_last * d_last
        prepare_parts["its Cholesky factor, G and W·Wᵀ (new)"] = built(last)
    else:
        prepare_parts["C0 of every layer (float64)"] = sum(8 * d * d for d in d_ins)
        prepare_parts["rule state"] = sum(others.values())
    prepare = Stage("prepare", prepare_parts)
    # --- rule state after N edits -----------------------------------------------------------------
    resident = {"weights": weights, "masters (float32)": masters, **summed("", state_of)}
    for m in modules:
        for k, v in module_state[m].items():
            resident[k] = v * len(cfg.layers)
    host_state = sum(v for k, v in resident.items() if k not in ("weights", "masters (float32)"))
    if offload:        # between rule calls the state is on the host; a rule call brings one layer's
        resident = {"weights": weights, "masters (float32)": masters}
        one_layer = {**resident, **{f"one layer's state: {k}": v for k, v in state_of(big_layer).items()}}
        for m in modules:
            one_layer.update({f"one layer's state: {k}": v for k, v in module_state[m].items()})
        state = Stage("rule state", dict(resident))
    else:
        one_layer = resident
        state = Stage("rule state", dict(resident))
    # --- targets ------------------------------------------------------------------------------------
    n_templates = 1 + len(cfg.context_template_prefixes)
    rows = min(batch, getattr(cfg, "target_batch", batch) or batch) * (n_templates + 1)
    after = n_layers - 1 - cfg.layers[-1]
    kv_dim = kv_heads * head_dim
    targets = Stage("targets", {
        **resident,
        "prefix key/value cache": rows * PREFIX_TOKENS * n_layers * 2 * kv_dim * s_w,
        "autograd activations": rows * SUFFIX_TOKENS * after * (10 * hidden + 4 * inter) * s_w
                                + rows * SUFFIX_TOKENS * (n_layers - after) * (4 * hidden + 2 * inter) * s_w,
        "attention scores": rows * heads * SUFFIX_TOKENS * (PREFIX_TOKENS + SUFFIX_TOKENS) * 4 * max(after, 1),
        "logits (float32, with log-softmax and grad)": 3 * rows * (TARGET_TOKENS + 1) * vocab * 4,
    })
    if dtype == "float32" and getattr(cfg, "target_dtype", None):
        # the steps' bf16 copies of the linear weights above the layer and of lm_head
        linear = hidden * (d_q + 2 * kv_dim) + d_q * hidden + (ffn_in_params + hidden * inter)
        targets.parts["bf16 weight copies for the steps"] = 2 * (after * linear + vocab * hidden)
    # --- solve (the largest layer) --------------------------------------------------------------------
    d_out, d_in = max(shapes.values(), key=lambda s: s[0] * s[1])
    n = batch
    if cfg.method == "mose" and side == "input":
        method = resolve_polar_method(cfg.polar_method, d_in, n)
        # S = W·C0⁻¹·Wᵀ is built from X = L⁻¹·Wᵀ where no kept edit moved it (gram_by_change)
        solve_parts = {"W (float64)": 8 * d_out * d_in,
                       "building S: L⁻¹·Wᵀ (float64)": 8 * d_in * d_out}
        if method in SUBSPACE_METHODS:
            depth = SUBSPACE_METHODS[method].get("krylov_depth", 0) + 1
            k = min(d_in, 2 * n * depth + SUBSPACE_METHODS[method].get("random_rank", 0))
            solve_parts["Krylov basis and products (float64)"] = 3 * 8 * d_in * k
            if gram_by_change(d_in, d_out, k):
                solve_parts["the change of S: U, C0⁻¹·U (float64)"] = 2 * 8 * d_in * k
        else:
            solve_parts["dense M, U, Vᴴ, R (float64)"] = 4 * 8 * d_in * d_in
            solve_parts["retention λ·G + μ·E formed (float64)"] = 8 * d_in * d_in
        if cfg.rule_hparams.get("edit_memory"):
            # the memory in float64 for the products, and where the commit compresses it, its QR
            m = min(n_keys, d_in)
            solve_parts["edit memory in float64"] = 8 * d_in * m
            if n_keys + n > d_in:
                solve_parts["compressing the memory at commit: "
                            "QR of d_in × (d_in + n), float64"] = 2 * 8 * d_in * (m + n)
    elif cfg.method == "mose":
        s_solve = 8 if cfg.solve_dtype == "float64" else 4
        solve_parts = {"dense M, U, Vᴴ, R": 4 * s_solve * d_out * d_out,
                       "P in the solve dtype": s_solve * d_out * d_out}
    else:
        solve_parts = {"W (float64)": 8 * d_out * d_in, "update Δ (float64)": 8 * d_out * d_in,
                       "solve of a d_in × d_in system (float64)": 8 * d_in * d_in}
    solve = Stage("solve", {**one_layer, **solve_parts})
    # --- host copies --------------------------------------------------------------------------------------
    per_copy = ((sum(o * i for o, i in shapes.values()) + extra_params)
                * (4 if (low_precision and cfg.master_weights) else s_w))
    host = Stage("host copies (snapshot + undo history)", {
        "this edit's snapshot": per_copy, f"undo history ({cfg.undo_history} edits)": cfg.undo_history * per_copy})
    if offload:
        host.name = "host (rule state + snapshot + undo history)"
        host.parts["rule state, every layer (pinned)"] = host_state
        # each layer's C0 waits on the host for its prepare; beyond the state where it is larger
        c0_total = sum(8 * d * d for d in d_ins) if per_layer_stats else 0
        host.parts["key statistics C0 waiting for prepare, beyond the state"] = max(0, c0_total - host_state)
    stages = [Stage("weights", {"weights": weights}), stats, prepare, state, targets, solve]
    if device == "cpu":        # on the CPU the host copies sit in the same memory: the undo history
        history, snapshot = host.parts[f"undo history ({cfg.undo_history} edits)"], host.parts["this edit's snapshot"]
        state.parts["host copies (undo history)"] = history
        for s in (targets, solve):      # and, during an edit, its snapshot
            s.parts["host copies (undo history and this edit's snapshot)"] = history + snapshot
    return Plan(model=str(model), preset=cfg.preset_name or cfg.method, layers=list(cfg.layers), edits=edits,
                batch=batch, dtype=dtype, device=device, stages=stages, host=host, gpu_mem=gpu_mem, offload=offload)


def llama2_13b_config():
    """LLaMA-2-13B's published config (for plans without the model on disk)."""
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def llama3_8b_config():
    """LLaMA-3-8B's published config."""
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False)


def human(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


__all__ = ["Plan", "Stage", "plan", "load_config", "meta_model", "llama2_13b_config", "llama3_8b_config", "human"]

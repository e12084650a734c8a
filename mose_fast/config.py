"""Hyperparameters of an edit, and the named presets that set them.

A configuration is a preset plus overrides: ``MOSEConfig.preset("mose", model_type)`` (the default
everywhere), ``MOSEConfig.preset("memit", "gptj", lam=...)``, or a JSON file
``{"preset": "mose", "layers": [4, 5, 6]}``.  ``presets()`` lists them.

The target-optimisation fields follow MEMIT's hparams (``v_lr``, ``v_num_grad_steps``,
``clamp_norm_factor``, ``kl_factor``, ``v_weight_decay``).  ``lam`` is MOSE's retention weight λ
in M = λ·G + V·Aᵀ; C0 is the *mean* second moment E[k kᵀ], so λ weighs the corpus like λ edit keys
(with ``rule_hparams.lam_unit = "per_dim"``: λ × the width of the rotated space, see
``rules.rotation.effective_lam``).

``modules`` names what an edit rotates at each edited layer, visited in forward order: "attn.qk"
(q_proj and k_proj by one shared rotation, ``rules/mose_attn.py``), "attn.v" (v_proj per kv
head), "mlp.in" (the FFN input projections, by a polynomial expansion of the activation,
``rules/mose_ffn_in.py``) and "mlp.down" (the FFN output projection with the rule ``method`` and
``rule_hparams`` name — the default, and the only module the additive methods have).
``module_hparams`` holds the other modules' rule options, e.g. ``{"mlp.in": {"poly_degree": 5}}``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("float64", "float32")
TARGET_DTYPES = ("bfloat16", "float16")

# The `mose` preset's rule, which is also MOSEConfig's default (one copy: the dataclass and the
# preset table both read it).
MOSE_LAM = 1000 / 1536
MOSE_RULE_HPARAMS = {"side": "input", "lam_unit": "per_dim", "edit_memory": 100.0, "memory_cap": 30.0}


@dataclass
class MOSEConfig:
    # --- the update rule -------------------------------------------------------------------------
    method: str = "mose"                 # mose | memit | alphaedit | rome | rect | prune
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    lam: float = MOSE_LAM                # MOSE's λ (per dimension with lam_unit "per_dim")
    rule_hparams: dict = field(default_factory=lambda: dict(MOSE_RULE_HPARAMS))
    polar_method: str = "auto"           # "auto": exact SVD for small d, block Krylov above
    # what each edited layer rotates, any of "attn.qk", "attn.v", "mlp.in", "mlp.down" (the rule above)
    modules: tuple[str, ...] = ("mlp.down",)
    module_hparams: dict = field(default_factory=dict)   # {module: options} for the modules but mlp.down
    solve_dtype: str = "float64"         # dtype of the polar solve
    # Re-solve an edit whose requests did not land (P(new) > P(true) on their own prompt) with the
    # missed requests' edit term weighted land_boost times more, up to land_retries times.
    land_retries: int = 2
    land_boost: float = 4.0
    # --- targets (MEMIT compute_z) ---------------------------------------------------------------
    v_lr: float = 1.0
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_weight_decay: float = 1e-3
    v_loss_early_stop: float = 5e-2
    # what a request's early stop compares with v_loss_early_stop: "nll", the target's NLL (the
    # target is reached even while the KL term holds the loss above the level), or "loss" (MEMIT:
    # NLL + KL + decay; the setting of runs made before this option existed)
    v_stop_on: str = "nll"
    # requests whose targets are optimised in one padded batch; a larger edit runs in chunks of
    # this many (each request's target is the same either way: only speed and memory change)
    target_batch: int = 16
    # dtype of the matrix products in the Adam steps of a float32 model (torch.autocast): "bfloat16"
    # runs them at the hardware's low-precision rate while h0, δ, the residual stream and the loss
    # stay in float32; None: everything in the model's dtype (the setting of earlier runs)
    target_dtype: str | None = "bfloat16"
    # --- context templates (ROME/MEMIT: generated prefixes, "{}" kept as the subject slot) -------
    context_template_prefixes: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_template_length: int = 10
    # --- key statistics C0 ------------------------------------------------------------------------
    stats_corpus: str | None = None      # text file; None: WikiText-2 in the data folder if there, else
                                         # text the model writes itself (memit.stats.generated_corpus)
    stats_tokens: int = 100_000
    stats_seq_len: int = 256
    stats_batch_size: int = 8
    stats_cache_dir: str | None = None   # None: $MOSE_CACHE_DIR or ~/.cache/mose_fast
    # --- bookkeeping ------------------------------------------------------------------------------
    seed: int = 0
    undo_history: int = 8                # edits kept for undo() (their weights, on the host)
    master_weights: bool = True          # float32 master copy of edited bf16/fp16 matrices
    preset_name: str | None = "mose"     # the preset this configuration started from ("preset" in JSON)


    def validate(self, where: str = "config") -> None:
        """Everything that can be checked without a model; ValueError naming the field."""
        from .rules import rule_class
        from .solve.polar import POLAR_METHODS
        from .solve.procrustes import SUBSPACE_METHODS

        def bad(name, msg):
            raise ValueError(f"{where}: {name} = {getattr(self, name)!r}: {msg}")
        if not isinstance(self.layers, list) or not self.layers or \
                any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in self.layers):
            bad("layers", "must be a non-empty list of layer indices ≥ 0")
        if sorted(set(self.layers)) != list(self.layers):
            bad("layers", "must be strictly increasing")
        if not isinstance(self.method, str):
            bad("method", "must be a string")
        rule = rule_class(self.method, self.rule_hparams)
        if not isinstance(self.rule_hparams, dict):
            bad("rule_hparams", "must be a JSON object")
        rule.check_options(self.rule_hparams, f"{where}: rule_hparams")
        self._validate_modules(where)
        if self.method == "rome" and len(self.layers) != 1:
            bad("layers", "ROME edits a single layer")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and self.lam != float("inf")):
            bad("lam", "must be a number ≥ 0")
        if self.solve_dtype not in DTYPES:
            bad("solve_dtype", f"choose from {DTYPES}")
        if self.v_stop_on not in ("loss", "nll"):
            bad("v_stop_on", "choose 'loss' or 'nll'")
        if self.target_dtype is not None and self.target_dtype not in TARGET_DTYPES:
            bad("target_dtype", f"choose from {TARGET_DTYPES} or null (the model's dtype)")
        methods = ("auto", *POLAR_METHODS, *SUBSPACE_METHODS)
        if self.polar_method not in methods:
            bad("polar_method", f"choose from {sorted(methods)}")
        for name in ("v_num_grad_steps", "stats_tokens", "stats_seq_len", "stats_batch_size", "target_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be an integer ≥ 1")
        for name in ("v_lr", "clamp_norm_factor"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                bad(name, "must be > 0")
        for name in ("kl_factor", "v_weight_decay", "v_loss_early_stop"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                bad(name, "must be ≥ 0")
        if isinstance(self.land_retries, bool) or not isinstance(self.land_retries, int) or self.land_retries < 0:
            bad("land_retries", "must be an integer ≥ 0")
        if not (isinstance(self.land_boost, (int, float)) and self.land_boost > 1.0):
            bad("land_boost", "must be > 1")
        if self.land_retries and not rule.supports_edit_weights:
            bad("land_retries", f"needs the MOSE rule (per-request edit weights); method is {self.method!r}")
        if isinstance(self.undo_history, bool) or not isinstance(self.undo_history, int) or self.undo_history < 0:
            bad("undo_history", "must be an integer ≥ 0")
        if self.stats_corpus is not None and not Path(self.stats_corpus).is_file():
            bad("stats_corpus", "is not a file")

    def _validate_modules(self, where: str) -> None:
        from .rules import MODULE_RULES, MODULES

        def bad(name, msg):
            raise ValueError(f"{where}: {name} = {getattr(self, name)!r}: {msg}")
        mods = self.modules
        if isinstance(mods, str) or not isinstance(mods, (tuple, list)) or not mods:
            bad("modules", f"must be a non-empty list of module names from {list(MODULES)}")
        unknown = [m for m in mods if m not in MODULES]
        if unknown:
            bad("modules", f"unknown module(s) {unknown}; choose from {list(MODULES)}")
        if len(set(mods)) != len(mods):
            bad("modules", "names a module twice")
        others = [m for m in mods if m != "mlp.down"]
        if others and self.method != "mose":
            bad("modules", f"{others} are MOSE rotations and need method 'mose' (method is {self.method!r})")
        if not isinstance(self.module_hparams, dict):
            bad("module_hparams", "must be a JSON object {module: {option: value}}")
        for m, hp in self.module_hparams.items():
            if m not in MODULE_RULES:
                bad("module_hparams", f"{m!r} is not a module with its own options (choose from "
                    f"{sorted(MODULE_RULES)}; mlp.down's are rule_hparams)")
            if m not in mods:
                bad("module_hparams", f"options for {m!r}, which modules does not select")
            if not isinstance(hp, dict):
                bad("module_hparams", f"the options of {m!r} must be a JSON object")
            MODULE_RULES[m].check_options(hp, f"{where}: module_hparams[{m!r}]")

    def validate_for_model(self, n_layers: int, where: str = "config") -> None:
        """The checks that need the model's depth (read from its config, no weights loaded)."""
        bad = [l for l in self.layers if l >= n_layers]
        if bad:
            raise ValueError(f"{where}: layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")

    # --- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["context_template_prefixes"] = list(self.context_template_prefixes)
        d["preset"] = d.pop("preset_name")
        d["modules"] = list(self.modules)
        # left out at the values that reproduce the behaviour from before they existed, so such a
        # configuration reads (and identifies its run folders) exactly as it did then
        if d["modules"] == ["mlp.down"]:
            del d["modules"]
        if not d["module_hparams"]:
            del d["module_hparams"]
        if d["target_dtype"] is None:
            del d["target_dtype"]
        if d["v_stop_on"] == "loss":
            del d["v_stop_on"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], model_type: str | None = None, where: str = "config") -> "MOSEConfig":
        """A preset plus overrides: ``d["preset"]`` (default "mose") and any other fields."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object of MOSEConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"preset_name"} | {"preset"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        name = d.pop("preset", "mose")
        return cls.preset(name, model_type, where=where, **d)

    @classmethod
    def from_json(cls, path: str | Path, model_type: str | None = None) -> "MOSEConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: not valid JSON ({e})") from None
        return cls.from_dict(d, model_type, where=str(path))

    @classmethod
    def preset(cls, name: str = "mose", model_type: str | None = None, where: str = "config",
               **overrides: Any) -> "MOSEConfig":
        """The named preset for a model family (``config.model_type``; None: the Llama family's
        layers), with ``overrides`` applied and validated."""
        if name not in PRESETS:
            raise ValueError(f"{where}: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        family = FAMILIES.get(model_type or "llama", FAMILIES["llama"])
        values = {**dataclasses.asdict(cls()), **family["targets"], "layers": list(family["layers"])}
        p = PRESETS[name]
        values.update(p.settings)
        if p.layers == "last":
            values["layers"] = [family["layers"][-1]]
        values["rule_hparams"] = dict(p.settings.get("rule_hparams", {}))
        values["preset_name"] = name
        for key in ("context_template_prefixes", "modules"):
            if key in overrides and isinstance(overrides[key], list):
                overrides[key] = tuple(overrides[key])
        values.update(overrides)
        cfg = cls(**values)
        cfg.validate(where)
        return cfg


# Per family: the edited layers and the target optimisation, shared by every preset so that presets
# differ only in their update rule.  "llama" (Llama, Mistral, Qwen2, SmolLM2) was set on
# SmolLM2-135M; GPT-2/GPT-J follow MEMIT's published GPT-J settings scaled to their depth.
_LLAMA = {"layers": [4, 5, 6, 7, 8], "targets": {"v_lr": 1.0, "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3}}
_GPT = {"layers": [3, 4, 5, 6, 7, 8], "targets": {"v_lr": 0.5, "clamp_norm_factor": 0.75, "v_weight_decay": 0.5}}
FAMILIES: dict[str, dict] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gpt2": _GPT, "gptj": _GPT,
    "gpt_neox": {"layers": [3, 4, 5, 6, 7, 8], "targets": _LLAMA["targets"]},
}


@dataclass(frozen=True)
class Preset:
    summary: str
    settings: dict
    layers: str = "family"       # "family": the family's edited layers; "last": only its last one


# λ of the authors' released LLaMA3-8B setting (preserve_lambda 1 × mom2_update_weight 15000) at
# d_out = 4096, expressed per output dimension (``effective_lam``): 3.662 × d_out on any model.
PAPER_LAM_PER_DIM = 15000 / 4096

PRESETS: dict[str, Preset] = {
    "mose": Preset(
        "MOSE, best measured here: input-side rotation keeping the unedited model and every earlier edit "
        "(λ = 1000 at d_in 1536, memory μ = 100 capped at 30), Krylov solve, 2 re-solves of edits that miss",
        {"method": "mose", "lam": MOSE_LAM, "polar_method": "auto", "solve_dtype": "float64",
         "land_retries": 2, "land_boost": 4.0, "rule_hparams": dict(MOSE_RULE_HPARAMS)}),
    "mose-paper": Preset(
        "MOSE as the authors release it: output-side rotation keeping the current model, "
        "λ = 15000 on LLaMA3-8B carried per output dimension, float32 SVD",
        {"method": "mose", "lam": PAPER_LAM_PER_DIM, "polar_method": "svd", "solve_dtype": "float32",
         "land_retries": 0, "rule_hparams": {"side": "output", "lam_unit": "per_dim"}}),
    "memit": Preset("MEMIT (additive, mass editing), λ = 100 on C0",
                    {"method": "memit", "land_retries": 0, "rule_hparams": {"mom2_update_weight": 100.0}}),
    "alphaedit": Preset("AlphaEdit (additive, projected onto C0's null space), threshold 1e-2, L2 10",
                        {"method": "alphaedit", "land_retries": 0, "rule_hparams": {"threshold": 0.01, "l2": 10.0}}),
    "rome": Preset("ROME (additive, rank one, one layer: the family's last edited layer)",
                   {"method": "rome", "land_retries": 0, "rule_hparams": {}}, layers="last"),
    "rect": Preset("RECT (MEMIT keeping the top 20 % relative changes), λ = 100",
                   {"method": "rect", "land_retries": 0,
                    "rule_hparams": {"mom2_update_weight": 100.0, "keep_ratio": 0.2}}),
    "prune": Preset("PRUNE (MEMIT with the accumulated update's singular values above σ_max(W0) "
                    "log-compressed), λ = 100",
                    {"method": "prune", "land_retries": 0, "rule_hparams": {"mom2_update_weight": 100.0}}),
}
DEFAULT_PRESET = "mose"


def presets() -> dict[str, str]:
    """{name: one-line summary} of every preset."""
    return {k: p.summary for k, p in PRESETS.items()}

"""Hyperparameters of an edit, with per-family presets and JSON loading.

The target-optimisation fields follow MEMIT's hparams (``v_lr``, ``v_num_grad_steps``,
``clamp_norm_factor``, ``kl_factor``, ``v_weight_decay``); ``lam`` is MOSE's retention weight
λ in ``M = λ·W·C0·Wᵀ + V_E·(W·K_E)ᵀ``.  Because ``C0`` here is the *mean* second moment
E[k kᵀ] (not a sum over tokens), λ reads as "how many corpus tokens one edit key is worth
against": λ = 100 weighs the corpus like 100 keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MOSEConfig:
    # --- where to edit -------------------------------------------------------------------
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    # --- the update rule: "mose" or an additive baseline (memit, rome, alphaedit, rect, prune) ----
    method: str = "mose"
    rule_hparams: dict = field(default_factory=dict)   # baselines' own (e.g. mom2_update_weight)
    # --- the rotation --------------------------------------------------------------------
    lam: float = 100.0                 # retention weight λ
    solve_dtype: str = "float64"       # dtype of M, the SVD and R (the reference is float64)
    polar_method: str = "svd"          # a key of procrustes.POLAR_METHODS or procrustes.SUBSPACE_METHODS
    # --- targets (MEMIT compute_z) ---------------------------------------------------------
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_weight_decay: float = 1e-3
    v_loss_early_stop: float = 5e-2
    # Passes over the edited layers per edit, all towards the same target z (computed once).  A
    # rotation meets only part of its share of the residual; a second pass re-reads keys and
    # residual on the model as the first pass left it and solves again ("re-solving after a
    # partial edit").  Rule state that remembers edits (MOSE's edit memory, AlphaEdit's K_p) is
    # written once, after the last pass, so no pass is held back by its own edit's keys.
    edit_passes: int = 1
    # Re-solve an edit whose requests did not land (issue 4, "λ schedule"): after the passes, each
    # request with target_true is checked on its own prompt, P(new) > P(true); if any fails, the
    # edit is taken back (bit for bit) and solved again towards the same z with the failed
    # requests' edit term weighted ``land_boost`` times more (weights w in M = λ·G + μ·E +
    # Σ_j w_j·v_j·a_jᵀ: a per-request λ/w), up to ``land_retries`` times.  MOSE rules only; requests
    # without target_true are never retried.
    land_retries: int = 0
    land_boost: float = 4.0
    # --- context templates (ROME/MEMIT: generated prefixes, "{}" kept as the subject slot) --
    context_template_prefixes: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_template_length: int = 10   # generated tokens per template
    # --- key statistics C0 -----------------------------------------------------------------
    stats_corpus: str | None = None     # text file; None → WikiText-2 under MOSE_DATA_DIR
    stats_tokens: int = 100_000
    stats_seq_len: int = 256
    stats_batch_size: int = 8
    stats_cache_dir: str | None = None  # None → $MOSE_CACHE_DIR or ~/.cache/mose_fast
    # --- bookkeeping -----------------------------------------------------------------------
    seed: int = 0
    # Edits kept for undo(): per edited layer a dense float64 R (d_out² · 8 bytes; 2.6 MB for
    # SmolLM2, 210 MB for a 13B down_proj) or, for the subspace methods, just (Q, Rk).
    undo_history: int = 16
    master_weights: bool = True        # float32 master copy for bf16/fp16 weights (bounds drift)

    def validate(self) -> None:
        if not self.layers or any((not isinstance(l, int)) or l < 0 for l in self.layers):
            raise ValueError(f"MOSEConfig.layers must be a non-empty list of layer indices, got {self.layers!r}")
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"MOSEConfig.layers must be strictly increasing, got {self.layers!r}")
        if not (self.lam >= 0):
            raise ValueError(f"MOSEConfig.lam must be >= 0, got {self.lam!r}")
        if self.solve_dtype not in ("float64", "float32"):
            raise ValueError(f"MOSEConfig.solve_dtype must be 'float64' or 'float32', got {self.solve_dtype!r}")
        from .solve.procrustes import POLAR_METHODS, SUBSPACE_METHODS
        if self.polar_method not in (*POLAR_METHODS, *SUBSPACE_METHODS):
            raise ValueError(f"MOSEConfig.polar_method {self.polar_method!r}: choose from "
                             f"{sorted((*POLAR_METHODS, *SUBSPACE_METHODS))}")
        if self.v_num_grad_steps < 1:
            raise ValueError("MOSEConfig.v_num_grad_steps must be >= 1")
        if not isinstance(self.edit_passes, int) or self.edit_passes < 1:
            raise ValueError(f"MOSEConfig.edit_passes must be an integer >= 1, got {self.edit_passes!r}")
        if not isinstance(self.land_retries, int) or self.land_retries < 0:
            raise ValueError(f"MOSEConfig.land_retries must be an integer >= 0, got {self.land_retries!r}")
        if not self.land_boost > 1.0:
            raise ValueError(f"MOSEConfig.land_boost must be > 1, got {self.land_boost!r}")
        if self.land_retries and self.method != "mose":
            raise ValueError(f"MOSEConfig.land_retries needs the MOSE rule (per-request edit weights); "
                             f"method={self.method!r}")
        if self.stats_tokens < 1:
            raise ValueError("MOSEConfig.stats_tokens must be >= 1")

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["context_template_prefixes"] = list(self.context_template_prefixes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MOSEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MOSEConfig field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "context_template_prefixes" in d:
            d["context_template_prefixes"] = tuple(d["context_template_prefixes"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "MOSEConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, model_type: str, **overrides: Any) -> "MOSEConfig":
        """Defaults tuned (or taken from MEMIT/AlphaEdit) for a model family."""
        base = dict(PRESETS.get(model_type, {}))
        base.update(overrides)
        return cls.from_dict(base)


# Per-family presets.  "llama" is what was tuned on SmolLM2-135M (30 layers); the others follow
# MEMIT's published GPT-J/GPT-2 settings scaled to their depth.
PRESETS: dict[str, dict[str, Any]] = {
    "llama": dict(layers=[4, 5, 6, 7, 8], lam=100.0, v_lr=0.5, clamp_norm_factor=4.0),
    "mistral": dict(layers=[4, 5, 6, 7, 8], lam=100.0),
    "qwen2": dict(layers=[4, 5, 6, 7, 8], lam=100.0),
    "gptj": dict(layers=[3, 4, 5, 6, 7, 8], lam=100.0, clamp_norm_factor=0.75, v_weight_decay=0.5),
    "gpt2": dict(layers=[3, 4, 5, 6, 7, 8], lam=100.0, clamp_norm_factor=0.75, v_weight_decay=0.5),
    "gpt_neox": dict(layers=[3, 4, 5, 6, 7, 8], lam=100.0),
}

"""Update rules, one per editor, all behind the interface of ``base.Rule``; they share keys, targets
and statistics and differ only in ``update``.

``make_rule(cfg)`` builds the rule named by ``MOSEConfig.method`` with ``MOSEConfig.rule_hparams``."""
from __future__ import annotations

import torch

from .alphaedit import AlphaEditRule
from .base import AdditiveRule, Rule, UpdateResult
from .memit import MEMITRule
from .mose import MOSE_OPTIONS, MOSERule, Rotation
from .mose_input import MOSEInputRule
from .prune import PRUNERule
from .rect import RECTRule
from .rome import ROMERule

RULES: dict[str, type[Rule]] = {"mose": MOSERule, "memit": MEMITRule, "rome": ROMERule,
                                "alphaedit": AlphaEditRule, "rect": RECTRule, "prune": PRUNERule}


def rule_class(method: str, rule_hparams: dict | None = None) -> type[Rule]:
    if method not in RULES:
        raise ValueError(f"method {method!r} is not a rule; choose from {sorted(RULES)}")
    if method == "mose" and (rule_hparams or {}).get("side", "output") == "input":
        return MOSEInputRule
    return RULES[method]


def make_rule(cfg) -> Rule:
    cls = rule_class(cfg.method, cfg.rule_hparams)
    if cfg.method == "mose":
        dtype = torch.float64 if cfg.solve_dtype == "float64" else torch.float32
        return cls(cfg.lam, cfg.polar_method, dtype, **cfg.rule_hparams)
    return cls(**cfg.rule_hparams)


__all__ = ["AdditiveRule", "AlphaEditRule", "MEMITRule", "MOSEInputRule", "MOSERule", "MOSE_OPTIONS", "PRUNERule",
           "RECTRule", "ROMERule", "RULES", "Rotation", "Rule", "UpdateResult", "make_rule", "rule_class"]

"""Update rules, one per editor, all behind the interface of ``base.Rule``; they share keys, targets
and statistics and differ only in ``update``.

``make_rule(cfg)`` builds the rule named by ``MOSEConfig.method`` with ``MOSEConfig.rule_hparams`` —
the rule of the FFN output projection ("mlp.down").  The other modules of ``MOSEConfig.modules``
("attn.qk", "attn.v", "mlp.in": MOSE rotations of attention and FFN inputs) have their own rules,
``make_unit_rule(cfg, module)``, with options from ``MOSEConfig.module_hparams[module]``.  An edit
visits the (layer, module) units in forward order: per layer ``MODULES`` as listed."""
from __future__ import annotations

import torch

from .alphaedit import AlphaEditRule
from .base import AdditiveRule, Rule, UpdateResult
from .memit import MEMITRule
from .mose_attn import MOSEAttnQKRule, MOSEAttnVRule
from .mose_ffn_in import MOSEFFNInputRule
from .mose_input import MOSEInputRule
from .mose_output import MOSERule
from .prune import PRUNERule
from .rect import RECTRule
from .rome import ROMERule
from .rotation import MOSE_OPTIONS, Rotation

RULES: dict[str, type[Rule]] = {"mose": MOSERule, "memit": MEMITRule, "rome": ROMERule,
                                "alphaedit": AlphaEditRule, "rect": RECTRule, "prune": PRUNERule}


# every module an edit can rotate, in forward order within a layer
MODULES = ("attn.qk", "attn.v", "mlp.in", "mlp.down")
MODULE_RULES: dict[str, type[Rule]] = {"attn.qk": MOSEAttnQKRule, "attn.v": MOSEAttnVRule,
                                       "mlp.in": MOSEFFNInputRule}


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


def make_unit_rule(cfg, module: str) -> Rule:
    """The rule of one module: ``make_rule(cfg)`` for "mlp.down", else the module's MOSE rule with
    MOSEConfig.lam (and rule_hparams' lam_unit) unless ``module_hparams[module]`` says otherwise."""
    if module == "mlp.down":
        return make_rule(cfg)
    if module not in MODULE_RULES:
        raise ValueError(f"unknown module {module!r}; choose from {list(MODULES)}")
    hp = dict((getattr(cfg, "module_hparams", None) or {}).get(module, {}))
    lam_unit = (cfg.rule_hparams or {}).get("lam_unit", "absolute") if cfg.method == "mose" else "absolute"
    if module == "mlp.in":
        dtype = torch.float64 if cfg.solve_dtype == "float64" else torch.float32
        return MOSEFFNInputRule(cfg.lam, lam_unit, cfg.polar_method, dtype, **hp)
    return MODULE_RULES[module](cfg.lam, lam_unit, **hp)


__all__ = ["AdditiveRule", "AlphaEditRule", "MEMITRule", "MODULES", "MODULE_RULES", "MOSEAttnQKRule", "MOSEAttnVRule",
           "MOSEFFNInputRule", "MOSEInputRule", "MOSERule", "MOSE_OPTIONS", "PRUNERule", "RECTRule", "ROMERule",
           "RULES", "Rotation", "Rule", "UpdateResult", "make_rule", "make_unit_rule", "rule_class"]

"""Update rules: one per editor, sharing keys, targets and statistics; only ``update`` differs.

``make_rule(method, cfg)`` builds the rule named by ``MOSEConfig.method`` with its hyperparameters
from ``MOSEConfig.rule_hparams``."""
from .alphaedit import AlphaEditRule
from .base import AdditiveRule, UpdateResult
from .memit import MEMITRule
from .mose import MOSERule, Rotation
from .prune import PRUNERule
from .rect import RECTRule
from .rome import ROMERule

RULES = {"mose": MOSERule, "memit": MEMITRule, "rome": ROMERule, "alphaedit": AlphaEditRule,
         "rect": RECTRule, "prune": PRUNERule}


def make_rule(cfg):
    import torch
    if cfg.method not in RULES:
        raise ValueError(f"unknown method {cfg.method!r}; available: {sorted(RULES)}")
    if cfg.method == "mose":
        try:
            return MOSERule(cfg.lam, cfg.polar_method, torch.float64 if cfg.solve_dtype == "float64" else torch.float32,
                            **cfg.rule_hparams)
        except TypeError as e:
            raise ValueError(f"bad rule_hparams for mose (retain, edit_memory, match_norms): {e}") from None
    if cfg.method == "rome" and len(cfg.layers) != 1:
        raise ValueError(f"ROME edits a single layer; got layers {cfg.layers}")
    try:
        return RULES[cfg.method](**cfg.rule_hparams)
    except TypeError as e:
        raise ValueError(f"bad rule_hparams for {cfg.method}: {e}") from None

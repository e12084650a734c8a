"""Update rules: one per editor, sharing keys, targets and statistics; only ``update`` differs.

``make_rule(method, cfg)`` builds the rule named by ``MOSEConfig.method`` with its hyperparameters
from ``MOSEConfig.rule_hparams``."""
from .alphaedit import AlphaEditRule
from .base import AdditiveRule, UpdateResult
from .memit import MEMITRule
from .mose import MOSERule, Rotation
from .mose_input import MOSEInputRule
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
        # side "output" (the paper): W ← R·W, R ∈ O(d_out); side "input": W ← W·Q, Q ∈ O(d_in)
        side = cfg.rule_hparams.get("side", "output")
        if side not in ("output", "input"):
            raise ValueError(f"mose rule_hparams side={side!r}: choose 'output' (W ← R·W) or 'input' (W ← W·Q)")
        rule = MOSEInputRule if side == "input" else MOSERule
        try:
            return rule(cfg.lam, cfg.polar_method, torch.float64 if cfg.solve_dtype == "float64" else torch.float32,
                        **cfg.rule_hparams)
        except TypeError as e:
            known = "retain, edit_memory, memory_cap, template_keys, side" if side == "input" else "retain, edit_memory, match_norms, side"
            raise ValueError(f"bad rule_hparams for mose side={side} ({known}): {e}") from None
    if cfg.method == "rome" and len(cfg.layers) != 1:
        raise ValueError(f"ROME edits a single layer; got layers {cfg.layers}")
    try:
        return RULES[cfg.method](**cfg.rule_hparams)
    except TypeError as e:
        raise ValueError(f"bad rule_hparams for {cfg.method}: {e}") from None

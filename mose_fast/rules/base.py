"""The interface every update rule implements, and the base of the additive editors.

The editor hands a rule, per edited layer, the keys ``K`` (d_in × n) and the residual ``resid``
(d_out × n) to add at the layer's output; the rule changes ``W`` in place.  The life of one edit:

    rule.prepare(layer, W, C0)            once per layer, before its first edit
    rec = rule.update(layer, W, K, resid) W changes; the rule's own state does not
    ...                                   (the editor may throw the edit away: it restores W)
    rule.commit(layer, rec.undo)          the edit is kept: it joins the rule's state
    rule.undo(layer, rec.undo)            later: take a committed edit back out of the state

Because ``update`` never touches the rule's state, an edit that fails (or is re-solved) half way
through its layers needs only its weights put back; the editor keeps those, and it puts them back
on ``undo`` as well, so the rule's ``undo`` reverts its state, never the weights.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class UpdateResult:
    objective: float            # the rule's own objective after the update (MOSE: Procrustes)
    objective_identity: float   # ... with no update
    orth_error: float           # ‖RᵀR − I‖_F for rotations; nan for additive rules
    undo: Any                   # the rule's record of this update: what commit() and undo() need
    seconds_solve: float
    seconds_apply: float


@dataclass(frozen=True)
class Option:
    default: Any
    doc: str
    check: Any = None           # callable(value) -> bool, or None


class Rule(abc.ABC):
    """An update rule.  ``OPTIONS`` names the rule's own hyperparameters (``MOSEConfig.rule_hparams``)
    with their defaults; ``check_options`` validates them without building anything."""
    name: ClassVar[str] = "rule"
    OPTIONS: ClassVar[dict[str, Option]] = {}
    supports_edit_weights: ClassVar[bool] = False   # update(..., edit_weights=w)

    @classmethod
    def check_options(cls, hparams: dict, where: str = "rule_hparams") -> dict:
        """The options with defaults filled in; ValueError naming ``where`` and the field if one is
        unknown or out of range."""
        unknown = sorted(set(hparams) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown} for the {cls.name} rule; "
                             f"known: {sorted(cls.OPTIONS) or 'none'}")
        out = {k: o.default for k, o in cls.OPTIONS.items()}
        out.update(hparams)
        for k, o in cls.OPTIONS.items():
            if o.check is not None and not o.check(out[k]):
                raise ValueError(f"{where}.{k} = {out[k]!r}: {o.doc}")
        return out

    @abc.abstractmethod
    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        """Build the layer's state from W and the key statistics C0 (once; kept state stays)."""

    @abc.abstractmethod
    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> UpdateResult:
        """Change W in place for keys K and residual resid; leave the rule's state as it is."""

    def commit(self, layer: int, record: Any) -> None:
        """The update ``record`` (from ``update``) is kept: fold it into the rule's state."""

    def undo(self, layer: int, record: Any) -> None:
        """Take a committed update back out of the rule's state (the editor restores W)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rule's state as named tensors (what a run folder checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``; layers restored this way keep it through ``prepare``."""
        if state:
            raise ValueError(f"the {self.name} rule keeps no state, got {sorted(state)}")

    @classmethod
    def planned_state(cls, d_out: int, d_in: int, kept_keys: int, hparams: dict) -> dict[str, int]:
        """Bytes of what the rule holds for one d_out × d_in layer after edits with ``kept_keys`` key
        columns in all, by part (``plan.py``'s rule-state stage; ``state_bytes`` counts the same
        tensors in a live rule)."""
        raise NotImplementedError(f"the {cls.name} rule does not say what state it plans")

    def state_bytes(self) -> int:
        """Bytes of every tensor the rule holds per layer (its state dict and what ``prepare`` builds,
        on any device): the tensors in the rule's ``{layer: tensor}`` attributes."""
        seen: dict[int, int] = {}
        for value in vars(self).values():
            if isinstance(value, dict):
                for t in value.values():
                    if isinstance(t, torch.Tensor):
                        seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and x == x and x != float("inf")


def non_negative(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 and x == x and x != float("inf")


def layer_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[int, torch.Tensor]:
    """{layer: tensor} from the entries ``f"{prefix}.{layer}"`` of a state dict."""
    out = {}
    for k, v in state.items():
        head, _, tail = k.partition(".")
        if head == prefix and tail.isdigit():
            out[int(tail)] = v
    return out


@dataclass
class AdditiveRecord:
    delta: torch.Tensor                  # Δ (float32, on the host): what the update added
    keys: torch.Tensor | None = None     # the edit's keys, for rules that remember them


class AdditiveRule(Rule):
    """Base of the additive editors: W ← W + Δ.  Subclasses implement ``delta``."""
    name = "additive"

    def __init__(self, **hparams):
        self.hparams = type(self).check_options(hparams)
        self.C0: dict[int, torch.Tensor] = {}
        self.W0: dict[int, torch.Tensor] = {}

    @classmethod
    def planned_state(cls, d_out: int, d_in: int, kept_keys: int, hparams: dict) -> dict[str, int]:
        return {"C0 (float64)": 8 * d_in * d_in, "W0 (float64)": 8 * d_out * d_in}

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        if layer not in self.C0:
            self.C0[layer] = C0.to(device=W.device, dtype=torch.float64)
            self.W0[layer] = W.detach().to(torch.float64).clone()

    @abc.abstractmethod
    def delta(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """The additive update Δ (d_out × d_in, float64) for keys K and residual resid."""

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> UpdateResult:
        if edit_weights is not None:
            raise ValueError(f"edit_weights need a MOSE rule; this rule is {self.name!r}")
        t = time.perf_counter()
        Wd = W.to(torch.float64)
        K, resid = K.to(Wd), resid.to(Wd)
        target = Wd @ K + resid
        D = self.delta(layer, Wd, K, resid)
        if not torch.isfinite(D).all():
            raise ValueError(f"{self.name}: non-finite update at layer {layer}; refusing to apply")
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        W_new = Wd + D                      # before the copy: Wd is W itself when W is float64
        with torch.no_grad():
            W.copy_(W_new.to(W.dtype))
        t_apply = time.perf_counter() - t
        fit = float((W_new @ K - target).pow(2).sum())
        return UpdateResult(objective=fit, objective_identity=float(resid.pow(2).sum()), orth_error=float("nan"),
                            undo=AdditiveRecord(D.to("cpu", torch.float32), K.detach().to("cpu", torch.float64)),
                            seconds_solve=t_solve, seconds_apply=t_apply)

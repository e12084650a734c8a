"""Per-layer rule state in host memory, one layer's on its device at a time.

An edit works on one layer at a time, but a rule keeps state for every edited layer (the input-side
rule: a float64 Cholesky factor of C0 and the cross Gram, d_in × d_in each, per layer: 2.3 GiB per
layer at LLaMA-3-8B).  ``RuleStateHome`` keeps that state on the host and brings one layer's to the
layer's device around each rule call (prepare, update, commit, undo), so the device holds the
weights and one layer's state.

It needs nothing from the rule but its layout: the state is the tensors in the rule's
``{layer: tensor}`` attributes (as ``Rule.state_bytes`` counts them).  On the way back only what the
call changed is copied: a tensor the call replaced, or changed in place (its version counter moved);
a tensor it left alone goes back to its host copy with no transfer.  Host copies are pinned
(``pin``, CUDA only) so the copies to the device run asynchronously from page-locked memory; a call
that copied something back waits for those copies before it returns, so the host copies are
complete whenever no rule call runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def layer_state(rule, layer: int) -> dict[str, torch.Tensor]:
    """{attribute: tensor} of ``rule``'s state for ``layer`` (its ``{layer: tensor}`` attributes)."""
    out = {}
    for name, value in vars(rule).items():
        if isinstance(value, dict):
            t = value.get(layer)
            if isinstance(t, torch.Tensor):
                out[name] = t
    return out


@dataclass
class _Moved:
    host: torch.Tensor
    device: torch.Tensor
    version: int


class RuleStateHome:
    """Moves rule state between the host and the layers' devices.

    ``host``: where the state lives between calls (the CPU).  ``pin``: page-locked host copies (only
    where CUDA is present).  On a CPU device the "device" copy is a clone, so the mechanism is the
    same everywhere (and testable without a GPU); ``MOSEEditor`` turns it on for CUDA weights only."""

    def __init__(self, pin: bool = True, host: str | torch.device = "cpu"):
        self.host = torch.device(host)
        self.pin = bool(pin) and torch.cuda.is_available()

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin and t.device.type == "cuda":
            out = torch.empty(t.shape, dtype=t.dtype, device=self.host, pin_memory=True)
            out.copy_(t, non_blocking=True)
            return out
        return t.to(self.host, copy=True)

    def release(self, rule, layer: int) -> None:
        """Move every tensor of ``layer``'s state that is not on the host there (after ``prepare``,
        or for state restored onto a device)."""
        copied = set()
        for name, t in layer_state(rule, layer).items():
            if t.device != self.host:
                getattr(rule, name)[layer] = self._to_host(t)
                copied.add(t.device)
        self._wait(copied)

    @contextlib.contextmanager
    def on_device(self, rule, layer: int, device: torch.device):
        """``layer``'s state on ``device`` for the block; on the host again after it (what the block
        changed copied back, the rest restored to its host copy), exceptions included."""
        device = torch.device(device)
        moved: dict[str, _Moved] = {}
        for name, t in layer_state(rule, layer).items():
            if t.device != self.host:
                continue
            dev = t.to(device, non_blocking=t.is_pinned()) if device.type != self.host.type else t.clone()
            getattr(rule, name)[layer] = dev
            moved[name] = _Moved(host=t, device=dev, version=dev._version)
        try:
            yield
        finally:
            copied = set()
            for name, value in vars(rule).items():
                if not isinstance(value, dict) or not isinstance(value.get(layer), torch.Tensor):
                    continue
                t, m = value[layer], moved.get(name)
                if m is not None and t is m.device and t._version == m.version:
                    value[layer] = m.host                 # unchanged: the host copy is still exact
                elif t.device != self.host or (m is not None and t is m.device):
                    value[layer] = self._to_host(t)       # new or changed on the device
                    copied.add(t.device)
            self._wait(copied)

    def _wait(self, devices) -> None:
        """The copies to pinned host memory are asynchronous: wait for them on every device they
        came from."""
        if self.pin:
            for d in devices:
                if d.type == "cuda":
                    torch.cuda.synchronize(d)


__all__ = ["RuleStateHome", "layer_state"]

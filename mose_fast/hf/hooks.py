"""Forward hooks: capture a module's input, edit a block's output, stop a forward early.

Decoder blocks return a tensor in some transformers families and a tuple whose first element is
the hidden state in others; :func:`_hidden` / :func:`_replace_hidden` treat both alike.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the deepest needed layer has run."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the first positional input of each module on every call (detached)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        def pre_hook(_m, args, _name=name):
            seen[_name].append(args[0].detach())
        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each module's hidden-state output on every call (detached)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(_m, _args, output, _name=name):
            seen[_name].append(_hidden(output).detach())
        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a block's hidden-state output by ``fn(hidden)`` (out of place, so autograd sees it)."""
    def hook(_m, _args, output):
        return _replace_hidden(output, fn(_hidden(output)))
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Raise :class:`StopForward` once ``module`` has run; catch it around the forward call."""
    def hook(_m, _args, _output):
        raise StopForward
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, stop_module: nn.Module, **inputs) -> None:
    """Forward ``model`` on ``inputs`` but skip every layer after ``stop_module``."""
    with stop_after(stop_module):
        try:
            model(**inputs)
        except StopForward:   # the intended end of a truncated forward
            return


def output_kind(output) -> int | None:
    """How a block returns its hidden state: 0 a tensor, k > 0 a tuple of the hidden state and k - 1
    Nones; None for anything else (such a block cannot be replayed)."""
    if isinstance(output, torch.Tensor):
        return 0
    if isinstance(output, tuple) and output and all(x is None for x in output[1:]):
        return len(output)
    return None


@contextmanager
def replaying(blocks: list[nn.Module], kinds: list[int], hidden: torch.Tensor) -> Iterator[None]:
    """Make ``blocks[:-1]`` pass their input through and ``blocks[-1]`` return ``hidden`` (each in
    its own output form, ``kinds`` from :func:`output_kind`) instead of computing anything: a forward
    then starts at the block after them from a recorded state.  Forward hooks still run (they wrap
    ``forward``), and a ``forward`` set on the instance (accelerate's offload hooks) is put back."""
    saved = {}
    last = len(blocks) - 1
    try:
        for k, block in enumerate(blocks):
            saved[block] = block.__dict__.get("forward")

            def replay(*args, _k=k, **kwargs):
                h = hidden if _k == last else (args[0] if args else kwargs["hidden_states"])
                return h if kinds[_k] == 0 else (h,) + (None,) * (kinds[_k] - 1)
            block.forward = replay
        yield
    finally:
        for block, forward in saved.items():
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64 (how far a replayed or cached forward is from the computed one)."""
    a, b = a.double(), b.to(a.device).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))

"""mose_fast.backends.full_precision_matmul: full-precision float32 products inside, the caller's
TF32 settings restored exactly outside — for every way torch 2.13 lets a user set them, including
the mixed legacy/new states torch itself refuses to read back."""
from __future__ import annotations

import pytest
import torch

from mose_fast.backends import fp32_precision_state, full_precision_matmul, set_fp32_precision_state

PER_OP = [("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
          ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")]


def observed() -> dict:
    """What a user can read, straight from torch: the per-op values as stored and each legacy
    getter's answer (or the error it raises)."""
    out = {key: torch._C._get_fp32_precision_getter(*key) for key in PER_OP}
    for name, getter in (("matmul_precision", torch.get_float32_matmul_precision),
                         ("cuda_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                         ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32)):
        try:
            out[name] = getter()
        except RuntimeError as e:
            out[name] = f"raises: {str(e)[:40]}"
    return out


def set_user_state(name: str) -> None:
    b = torch.backends
    if name == "default":
        return
    if name == "legacy allow_tf32":
        b.cuda.matmul.allow_tf32 = True
        b.cudnn.allow_tf32 = True
    elif name == "matmul precision high":
        torch.set_float32_matmul_precision("high")
    elif name == "matmul precision medium":
        torch.set_float32_matmul_precision("medium")
    elif name == "new api, generic tf32":
        b.fp32_precision = "tf32"
    elif name == "new api, cuda matmul tf32":
        b.cuda.matmul.fp32_precision = "tf32"
    elif name == "new api, mkldnn bf16":
        b.mkldnn.matmul.fp32_precision = "bf16"
    elif name == "mixed: high, then cuda allow_tf32 off":   # legacy getters raise in this state
        torch.set_float32_matmul_precision("high")
        b.cuda.matmul.allow_tf32 = False
    elif name == "mixed: cudnn conv ieee only":
        b.cudnn.conv.fp32_precision = "ieee"
    elif name == "cudnn tf32 off":
        b.cudnn.allow_tf32 = False
    else:
        raise KeyError(name)


USER_STATES = ["default", "legacy allow_tf32", "matmul precision high", "matmul precision medium",
               "new api, generic tf32", "new api, cuda matmul tf32", "new api, mkldnn bf16",
               "mixed: high, then cuda allow_tf32 off", "mixed: cudnn conv ieee only", "cudnn tf32 off"]


@pytest.fixture
def restore_torch_precision():
    saved = fp32_precision_state()
    yield
    set_fp32_precision_state(saved)


def assert_full_precision():
    for key in [("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
                ("mkldnn", "rnn")]:
        assert torch._C._get_fp32_precision_getter(*key) == "ieee", key
    # the legacy getters agree (they raise on any inconsistency) and say "no TF32"
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False


@pytest.mark.parametrize("user", USER_STATES)
def test_full_precision_inside_and_user_state_restored(user, restore_torch_precision):
    set_user_state(user)
    before = observed()
    with full_precision_matmul():
        assert_full_precision()
    assert observed() == before
    with pytest.raises(ZeroDivisionError):
        with full_precision_matmul():
            assert_full_precision()
            1 / 0
    assert observed() == before


def test_nested_and_as_decorator(restore_torch_precision):
    set_user_state("legacy allow_tf32")
    before = observed()

    @full_precision_matmul()
    def work():
        assert_full_precision()
        with full_precision_matmul():
            assert_full_precision()
        assert_full_precision()
        return 7
    assert work() == 7 and work() == 7
    assert observed() == before


def test_state_round_trip_reads_mixed_states(restore_torch_precision):
    """fp32_precision_state reads the legacy switches even where torch's own getters raise, and
    setting it back reproduces what a user observes."""
    set_user_state("mixed: high, then cuda allow_tf32 off")
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    state, before = fp32_precision_state(), observed()
    assert state["float32_matmul_precision"] == "highest" and state[("mkldnn", "matmul")] == "tf32"
    torch.set_float32_matmul_precision("medium")
    set_fp32_precision_state(state)
    assert observed() == before

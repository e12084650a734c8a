"""Target optimisation: the fast tail (only blocks after the edited layer) equals full forwards."""
import pytest
import torch

from conftest import FAMILIES, make_tiny_model, tiny_mose_config
from mose_fast import EditRequest
from mose_fast import targets as T
from mose_fast.arch import resolve_arch
from mose_fast.keys import generate_context_templates
from mose_fast.tokens import pad_batch

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English French")


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_tail_reproduces_full_forward(family, monkeypatch):
    model, tok = make_tiny_model(family)
    arch = resolve_arch(model)
    batch = pad_batch(tok, [tok("The capital of France is")["input_ids"], tok("Apple was founded by Steve")["input_ids"]])
    tail = T._Tail(model, arch, 1, batch)
    assert tail.usable, family
    # with a perturbation after block 1 the tail must still match a hooked full forward
    bump = 0.5 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3])
    h = tail.h_layer.clone()
    h[rows, cols] += bump
    mine = tail.logits_at(h, torch.tensor([0, 1]), torch.tensor([4, 4]))
    from mose_fast.hooks import edit_output

    def add(hidden):
        out = hidden.clone()
        out[rows, cols] += bump
        return out
    with edit_output(arch.block(model, 1), add), torch.no_grad():
        ref = model(**batch, use_cache=False).logits[torch.tensor([0, 1]), torch.tensor([4, 4])]
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.model
def test_target_same_with_and_without_tail(monkeypatch):
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    cfg = tiny_mose_config(v_num_grad_steps=6)
    templates = generate_context_templates(model, tok, ("The",), 3, seed=0)
    fast = T.compute_target(model, tok, arch, 2, REQ, templates, cfg)
    real_init = T._Tail.__init__

    def disabled(self, *a, **k):
        real_init(self, *a, **k)
        self.usable = False
    monkeypatch.setattr(T._Tail, "__init__", disabled)
    slow = T.compute_target(model, tok, arch, 2, REQ, templates, cfg)
    assert fast.steps == slow.steps
    torch.testing.assert_close(fast.z, slow.z, rtol=1e-4, atol=1e-5)
    assert fast.nll == pytest.approx(slow.nll, rel=1e-4)
    # the optimisation did something: the target's NLL fell
    assert fast.nll < T.compute_target(model, tok, arch, 2, REQ, templates,
                                       tiny_mose_config(v_num_grad_steps=1)).nll


@pytest.mark.model
def test_target_respects_norm_clamp():
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    cfg = tiny_mose_config(v_num_grad_steps=10, clamp_norm_factor=0.05, v_lr=5.0)
    templates = [["{}"]]
    res = T.compute_target(model, tok, arch, 2, REQ, templates, cfg)
    assert float((res.z - res.h0).norm()) <= 0.05 * float(res.h0.norm()) * (1 + 1e-5)

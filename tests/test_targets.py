"""Target optimisation: the prefix-cached suffix forward equals full forwards."""
import pytest
import torch

from conftest import FAMILIES, make_tiny_model, tiny_mose_config
from mose_fast import EditRequest
from mose_fast.memit import targets as T
from mose_fast.hf.arch import resolve_arch
from mose_fast.memit.keys import generate_context_templates
from mose_fast.hf.hooks import edit_output
from mose_fast.hf.tokens import pad_batch

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English French")


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_reproduces_full_forward(family):
    """With δ added after block 1 at each row's lookup position (one of them 0), the cached
    suffix forward gives the full forward's logits at every selected position."""
    model, tok = make_tiny_model(family)
    arch = resolve_arch(model)
    ids = [tok("The capital of France is Paris")["input_ids"], tok("Apple was founded by Steve")["input_ids"],
           tok("Rome is")["input_ids"]]
    lookup = [3, 2, 0]
    sel_rows, sel_cols = [0, 0, 1, 2, 2], [3, len(ids[0]) - 1, 4, 0, len(ids[2]) - 1]
    runner = T._PrefixCache(model, arch, 1, ids, lookup, sel_rows, sel_cols, tok)
    assert runner.usable, family
    delta = 0.5 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = runner.logits(delta)

    def add(hidden):
        out = hidden.clone()
        out[torch.arange(3), torch.tensor(lookup)] += delta
        return out
    with edit_output(arch.block(model, 1), add), torch.no_grad():
        ref = model(**pad_batch(tok, ids), use_cache=False).logits[torch.tensor(sel_rows), torch.tensor(sel_cols)]
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    # and the cache is not consumed by a step: a second call gives the same logits
    with torch.no_grad():
        torch.testing.assert_close(runner.logits(delta), mine)


@pytest.mark.model
def test_target_same_with_and_without_cache(monkeypatch):
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    cfg = tiny_mose_config(v_num_grad_steps=6)
    templates = generate_context_templates(model, tok, ("The",), 3, seed=0)
    fast = T.compute_target(model, tok, arch, 2, REQ, templates, cfg)
    real_init = T._PrefixCache.__init__

    def disabled(self, *a, **k):
        real_init(self, *a, **k)
        self.usable = False
    monkeypatch.setattr(T._PrefixCache, "__init__", disabled)
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

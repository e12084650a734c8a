"""Keys (MEMIT ``compute_ks``): each context template's key against keys computed one template at a
time, their group-weighted mean, and the one-forward ``keys_and_outputs`` against the separate
``compute_keys`` and ``block_outputs_at_subject``."""
import pytest
import torch

from conftest import make_tiny_model
from mose_fast import EditRequest
from mose_fast.hf.arch import resolve_arch
from mose_fast.memit.keys import (block_outputs_at_subject, compute_keys, compute_template_keys,
                                  generate_context_templates, keys_and_outputs, mean_key, template_weights)

REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French"),
        EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")]
TEMPLATES = [["{}"], ["Once upon a time. {}", "I think. {}", "The end. {}"]]
OMEGA = torch.tensor([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3], dtype=torch.float64)


def test_template_weights_are_memits_group_means():
    torch.testing.assert_close(template_weights(TEMPLATES), OMEGA, atol=0, rtol=0)
    torch.testing.assert_close(template_weights([["{}"]]), torch.ones(1, dtype=torch.float64), atol=0, rtol=0)


def test_mean_key_averages_within_then_across_groups():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    want = 0.5 * rows[:, 0] + 0.5 * rows[:, 1:].mean(1)
    torch.testing.assert_close(mean_key(rows, TEMPLATES), want, atol=1e-15, rtol=0)
    torch.testing.assert_close(mean_key(rows, TEMPLATES), torch.einsum("ntd,t->nd", rows, OMEGA), atol=1e-15, rtol=0)


@pytest.mark.model
def test_per_template_keys_are_each_templates_own_key_and_average_to_the_mean_key():
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    rows = compute_template_keys(model, tok, arch, 1, REQS, TEMPLATES)
    flat = [t for g in TEMPLATES for t in g]
    assert rows.shape == (len(REQS), len(flat), model.config.intermediate_size)
    for t, template in enumerate(flat):    # one template at a time: a batch of its own, other padding
        alone = compute_keys(model, tok, arch, 1, REQS, [[template]])
        torch.testing.assert_close(rows[:, t], alone, atol=1e-5, rtol=1e-5)
    mean = torch.einsum("ntd,t->nd", rows.double(), template_weights(TEMPLATES))
    torch.testing.assert_close(mean, compute_keys(model, tok, arch, 1, REQS, TEMPLATES).double(), atol=1e-6, rtol=1e-6)
    assert (rows[:, 1:] - rows[:, :1]).abs().amax() > 1e-3       # the contexts do move the key


@pytest.mark.model
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keys_and_outputs_is_compute_keys_and_block_outputs_in_one_forward(family):
    """In float64, so that the batches' different padding rounds below the tolerance."""
    model, tok = make_tiny_model(family)
    model.double()
    arch = resolve_arch(model)
    templates = generate_context_templates(model, tok, ("The", "I"), 3, seed=0)
    assert templates[0] == ["{}"] and len(templates[1]) == 2
    for layer, out_layer in ((1, 2), (2, 2), (0, 3)):
        K, h = keys_and_outputs(model, tok, arch, layer, out_layer, REQS, templates)
        assert K.dtype == h.dtype == torch.float64
        torch.testing.assert_close(K, compute_keys(model, tok, arch, layer, REQS, templates), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(h, block_outputs_at_subject(model, tok, arch, out_layer, REQS), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="precedes the key layer"):
        keys_and_outputs(model, tok, arch, 2, 1, REQS, templates)
    with pytest.raises(ValueError, match="bare prompt"):
        keys_and_outputs(model, tok, arch, 1, 2, REQS, [["I think. {}"]])


@pytest.mark.model
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keys_read_off_a_forward_of_the_whole_prompt(family):
    """The keys are computed on prompts cut after the subject; each equals the FFN output
    projection's input at the subject's last token in a forward of the whole templated prompt, one
    prompt at a time (float64)."""
    from mose_fast.hf.hooks import capture_inputs
    from mose_fast.hf.tokens import subject_last_index
    model, tok = make_tiny_model(family)
    model.double()
    arch = resolve_arch(model)
    rows = compute_template_keys(model, tok, arch, 1, REQS, TEMPLATES)
    flat = [t for g in TEMPLATES for t in g]
    for j, req in enumerate(REQS):
        for t, template in enumerate(flat):
            ids, p = subject_last_index(tok, template.replace("{}", req.template, 1), req.subject)
            assert p < len(ids) - 1                      # there are tokens after the subject to cut
            with capture_inputs({"k": arch.mlp_out_module(model, 1)}) as seen, torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            torch.testing.assert_close(rows[j, t], seen["k"][0][0, p], atol=1e-10, rtol=0)

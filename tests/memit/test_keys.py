"""Keys (MEMIT ``compute_ks``): each context template's key against keys computed one template at a
time, their group-weighted mean, and the one-forward ``keys_and_outputs`` against the separate
``compute_keys`` and ``block_outputs_at_subject``."""
import pytest
import torch

from mose_fast import EditRequest
from mose_fast.hf.arch import resolve_arch
from mose_fast.memit.keys import (
    SubjectForward,
    block_outputs_at_subject,
    compute_keys,
    compute_template_keys,
    generate_context_templates,
    keys_and_outputs,
    mean_key,
    template_weights,
)

from helpers import make_tiny_model

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


def _perturb(model, arch, layer, seed):
    g = torch.Generator().manual_seed(seed)
    W = arch.weight_view(model, layer)
    with torch.no_grad():
        W.add_(0.05 * torch.randn(W.shape, generator=g, dtype=W.dtype) * W.abs().mean())


@pytest.mark.model
@pytest.mark.parametrize("family, chunk_rows", [("llama", None), ("gpt2", None), ("gpt_neox", None), ("llama", 2)])
def test_subject_forward_replays_unchanged_blocks_and_equals_a_full_forward(family, chunk_rows):
    """A pass over layers 1 and 2 (the keys of each read after the previous layer's weights
    changed) gives what a fresh full forward gives, in float64, without computing the blocks below
    the first changed one; a change it is not told of is not seen (the blocks are replayed).  With
    ``chunk_rows`` 2 the rows run in chunks of two (sorted by length, each padded to its own
    width), with the same results."""
    model, tok = make_tiny_model(family)
    model.double()
    arch = resolve_arch(model)
    templates = generate_context_templates(model, tok, ("The", "I"), 3, seed=0)
    fwd = SubjectForward(model, tok, arch, REQS, templates, check=False, chunk_rows=chunk_rows)
    if chunk_rows:
        assert len(fwd.chunks) == 3 and sorted(r for c in fwd.chunks for r in c) == list(range(6))
        widths = [int(b["input_ids"].shape[1]) for b in fwd.chunk_inputs]
        assert widths == sorted(widths) and widths[0] < widths[-1]
    K1, h1 = keys_and_outputs(model, tok, arch, 1, 3, REQS, templates, fwd)
    torch.testing.assert_close(K1, compute_keys(model, tok, arch, 1, REQS, templates), atol=1e-10, rtol=1e-10)
    _perturb(model, arch, 1, 0)
    fwd.edited(1)
    ran = []
    hooks = [arch.block(model, k).get_submodule(arch.mlp_out.rsplit(".", 1)[0]).register_forward_pre_hook(
        lambda _m, args, _k=k: ran.append((_k, args[0].shape[0]))) for k in range(arch.num_layers(model))]
    try:
        K2, h2 = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
    finally:
        for h in hooks:
            h.remove()
    rows, n = len(REQS) * sum(len(g) for g in templates), len(REQS)
    # block 0 replayed; every row runs blocks 1-2, and the bare prompts alone run 1-3 (from their own record)
    rows_per_block = {k: sum(m for kk, m in ran if kk == k) for k, _ in ran}
    assert rows_per_block == {1: rows + n, 2: rows + n, 3: n}
    assert len(ran) == (9 if chunk_rows else 5)                 # 3 chunks of 2 rows (bare: 1) per block
    K2_full, h2_full = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates)
    torch.testing.assert_close(K2, K2_full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h2, h2_full, atol=1e-10, rtol=1e-10)
    assert (h2 - h1).abs().max() > 1e-4                    # the change at layer 1 reached layer 3
    torch.testing.assert_close(block_outputs_at_subject(model, tok, arch, 3, REQS, fwd),
                               block_outputs_at_subject(model, tok, arch, 3, REQS), atol=1e-10, rtol=1e-10)
    # block 0 changed without telling the forward: the replay does not see it ...
    _perturb(model, arch, 0, 1)
    fwd.edited(2)
    K_stale, _ = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
    K_true, _ = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates)
    assert (K_stale - K_true).abs().max() > 1e-6
    # ... and told of it, it does
    fwd.edited(0)
    K_told, _ = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
    torch.testing.assert_close(K_told, K_true, atol=1e-10, rtol=1e-10)


@pytest.mark.model
def test_subject_forward_check_falls_back_to_full_forwards_when_a_replay_differs():
    """The first replayed forward is compared with a full one: a replay that does not reproduce
    it (here a corrupted record, as a model passing state between blocks would give) is dropped
    and every later forward runs in full."""
    model, tok = make_tiny_model("llama")
    model.double()
    arch = resolve_arch(model)
    templates = [["{}"], ["I think. {}"]]
    fwd = SubjectForward(model, tok, arch, REQS, templates, check=True)
    ran = []
    hook = arch.block(model, 1).register_forward_pre_hook(lambda _m, args: ran.append(args[0].shape[0]))
    try:
        keys_and_outputs(model, tok, arch, 1, 3, REQS, templates, fwd)
    finally:
        hook.remove()
    # every row through the keys' layer, then the bare prompts alone through block 3
    assert ran == [len(REQS) * 2, len(REQS)]
    fwd.edited(2)
    fwd.outputs[1] = [o + 1.0 for o in fwd.outputs[1]]
    K, h = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
    K_full, h_full = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates)
    torch.testing.assert_close(K, K_full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h, h_full, atol=1e-10, rtol=1e-10)
    assert fwd.replays is False and fwd.check is False
    fwd.edited(2)
    fwd.outputs[1] = [o + 1.0 for o in fwd.outputs[1]]
    torch.testing.assert_close(keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)[0], K_full,
                               atol=1e-10, rtol=1e-10)


def _rotate_down(model, arch, layer, seed):
    """W ← W·Q for a random orthogonal Q: what an input-side edit does to the FFN output projection."""
    g = torch.Generator().manual_seed(seed)
    W = arch.weight_view(model, layer)
    Q = torch.linalg.qr(torch.randn(W.shape[1], W.shape[1], generator=g, dtype=torch.float64))[0]
    with torch.no_grad():
        W.copy_(W.double() @ Q)


@pytest.mark.model
@pytest.mark.parametrize("family, chunk_rows", [("llama", None), ("gpt2", None), ("gpt_neox", None), ("gptj", None),
                                               ("llama", 4)])
def test_patching_an_edited_down_projection_equals_computing_its_block(family, chunk_rows):
    """After the FFN output projection of layer 1 changes, ``patch(1)`` writes block 1's output from
    the projection's captured input and output without running the block; the next layer's keys and
    the last layer's outputs are those of a full forward (float64), and ``rewind(1)`` after the
    weights are put back gives the unedited model's keys again."""
    model, tok = make_tiny_model(family)
    model.double()
    arch = resolve_arch(model)
    templates = generate_context_templates(model, tok, ("The", "I"), 3, seed=0)
    fwd = SubjectForward(model, tok, arch, REQS, templates, check=True, chunk_rows=chunk_rows)
    keys_and_outputs(model, tok, arch, 1, 3, REQS, templates, fwd)
    W = arch.weight_view(model, 1)
    before = W.clone()
    fwd.edited(1)
    _rotate_down(model, arch, 1, 0)
    assert fwd.patch(1) and fwd.patches and fwd.replays and not fwd.check_patch
    ran = []
    mlp = arch.mlp_out.rsplit(".", 1)[0]
    hooks = [arch.block(model, k).get_submodule(mlp).register_forward_pre_hook(
        lambda _m, args, _k=k: ran.append((_k, args[0].shape[0]))) for k in range(arch.num_layers(model))]
    try:
        K2, h2 = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
    finally:
        for h in hooks:
            h.remove()
    rows, n = len(REQS) * sum(len(g) for g in templates), len(REQS)
    # every row runs block 2 only (block 1 patched); the bare prompts run 1-3 from their own record
    rows_per_block = {k: sum(m for kk, m in ran if kk == k) for k, _ in ran}
    assert rows_per_block == {1: n, 2: rows + n, 3: n}
    K2_full, h2_full = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates)
    torch.testing.assert_close(K2, K2_full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h2, h2_full, atol=1e-10, rtol=1e-10)
    # put the weights back: the rewound record gives the unedited model's keys at layer 2
    with torch.no_grad():
        W.copy_(before)
    assert fwd.rewind(1)
    K2_again, _ = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
    torch.testing.assert_close(K2_again, compute_keys(model, tok, arch, 2, REQS, templates), atol=1e-10, rtol=1e-10)


@pytest.mark.model
def test_patch_check_computes_the_block_when_its_output_is_not_the_projection_plus_the_rest():
    """A block whose output scales the FFN's output (here by a hook: out = mid + 2·down(x)) is not
    moved by down(x) − y; the first patch is compared with the computed block, patching is turned
    off, and the keys stay those of a full forward."""
    model, tok = make_tiny_model("llama")
    model.double()
    arch = resolve_arch(model)
    mlp = arch.block(model, 1).get_submodule(arch.mlp_out.rsplit(".", 1)[0])
    handle = mlp.register_forward_hook(lambda _m, _a, out: 2 * out)
    try:
        templates = [["{}"], ["I think. {}"]]
        fwd = SubjectForward(model, tok, arch, REQS, templates, check=True)
        keys_and_outputs(model, tok, arch, 1, 3, REQS, templates, fwd)
        fwd.edited(1)
        _rotate_down(model, arch, 1, 1)
        assert fwd.patch(1)                      # the block was computed instead
        assert fwd.patches is False and fwd.replays
        K2, h2 = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates, fwd)
        K2_full, h2_full = keys_and_outputs(model, tok, arch, 2, 3, REQS, templates)
        torch.testing.assert_close(K2, K2_full, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(h2, h2_full, atol=1e-10, rtol=1e-10)
        fwd.edited(2)
        _rotate_down(model, arch, 2, 2)
        assert not fwd.patch(2)                  # off for the rest of this forward
    finally:
        handle.remove()

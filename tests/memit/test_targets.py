"""Target optimisation: the prefix-cached suffix forward equals full forwards; the batched
optimisation equals one request at a time (float64); early stopping is per request."""
import pytest
import torch

from mose_fast import EditRequest
from mose_fast.hf.arch import resolve_arch
from mose_fast.hf.hooks import edit_output
from mose_fast.hf.tokens import pad_batch
from mose_fast.memit import prefix_cache as P
from mose_fast.memit import targets as T
from mose_fast.memit.keys import generate_context_templates
from mose_fast.memit.naive import naive_target

from helpers import FAMILIES, make_tiny_model, tiny_mose_config

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English French")
REQS = [REQ,
        EditRequest("{} plays the sport of", "Michael Jordan", "soccer"),
        EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
        EditRequest("Apple was founded by", "Apple", "Bill Gates")]


def _model(family="llama", dtype=torch.float32):
    model, tok = make_tiny_model(family)
    return model.to(dtype), tok


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_reproduces_full_forward(family):
    """With δ_j added after block 1 at the subject position of request j's rows, the cached suffix
    forward gives the full forward's logits at every selected position, also after some requests'
    rows have left the batch, and a step does not consume the cache."""
    model, tok = _model(family)
    arch = resolve_arch(model)
    templates = [["{}"], ["The cat. {}", "I think that {}"]]
    batch = P.PromptRows(tok, REQS[:3], templates)
    runner = P.PrefixCache(model, arch, 1, batch, tok)
    assert runner.usable and runner.replays, family
    delta = 0.5 * torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def reference(rows):
        def add(hidden):
            out = hidden.clone()
            for i, r in enumerate(rows):
                out[i, batch.lookup[r]] += delta[batch.row_request[r]]
            return out
        sel = [(rows.index(r), c) for r, c in zip(batch.sel_rows, batch.sel_cols) if r in rows]
        with edit_output(arch.block(model, 1), add), torch.no_grad():
            logits = model(**pad_batch(tok, [batch.ids[r] for r in rows]), use_cache=False).logits
        return logits[torch.tensor([s[0] for s in sel]), torch.tensor([s[1] for s in sel])]

    with torch.no_grad():
        mine = runner.logits(delta)
        torch.testing.assert_close(mine, reference(list(range(len(batch.ids)))), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(runner.logits(delta), mine)          # the cache is not consumed
        runner.select([0, 2])                                           # request 1 stopped
        torch.testing.assert_close(runner.logits(delta), reference(batch.rows_of([0, 2])), rtol=1e-4, atol=1e-5)


@pytest.mark.model
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replayed_blocks_give_the_computed_logits_and_gradient(family):
    """A step replays blocks 0..layer (recorded at δ = 0) instead of running them: no module of
    those blocks runs, and the logits and dL/dδ equal those of a step computing every block (float64),
    also after a request has left the batch.  A forward set on a block instance (accelerate's hooks)
    is back in place afterwards, and a block without one has none."""
    model, tok = _model(family, torch.float64)
    arch = resolve_arch(model)
    batch = P.PromptRows(tok, REQS, [["{}"], ["The cat. {}", "I think that {}"]])
    runner = P.PrefixCache(model, arch, 2, batch, tok)
    assert runner.replays
    own = arch.block(model, 1).forward
    arch.block(model, 1).forward = own                     # an instance attribute, as accelerate sets
    ran = []
    handles = [m.register_forward_hook(lambda *_: ran.append(1))
               for k in range(3) for m in arch.block(model, k).modules() if not list(m.children())]
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(len(REQS), model.config.hidden_size, generator=g, dtype=torch.float64)
    weights = torch.randn(len(batch.sel_rows), model.config.vocab_size, generator=g, dtype=torch.float64)
    try:
        for keep in (None, [0, 1, 3]):
            if keep:
                runner.select(keep)
                weights = weights[:len(runner.sel_rows_local)]
            results = []
            for mode in ("replay", "compute"):
                d = delta.clone().requires_grad_(True)
                ran.clear()
                logits = runner._cached_forward(d, mode)
                (logits * weights).sum().backward()
                results.append((logits.detach(), d.grad, len(ran)))
            (lr, gr, n_replay), (lc, gc, n_compute) = results
            assert n_replay == 0 and n_compute > 0
            torch.testing.assert_close(lr, lc, rtol=0, atol=1e-10)
            torch.testing.assert_close(gr, gc, rtol=0, atol=1e-10)
            assert gr.abs().sum() > 0
    finally:
        for h in handles:
            h.remove()
    assert arch.block(model, 1).__dict__["forward"] is own
    assert "forward" not in arch.block(model, 2).__dict__


def test_packing_places_every_row_once_within_the_width():
    """First-fit decreasing: every row in exactly one packed row, none longer than the width or with
    more than the allowed rows; choose_packing takes the width with the fewest tokens."""
    lengths = [6, 3, 3, 5, 4, 3, 6, 2, 3]
    for width in (6, 7, 9, 12):
        bins = P.pack_rows(lengths, width, max_segments=3)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= width and len(b) <= 3 for b in bins)
    assert P.pack_rows([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    width, bins = P.choose_packing([3] * 10 + [6] * 4)        # KL-like rows of 3 and rewrite rows of 6
    assert len(bins) * width == 54 and width == 6               # unpacked: 14 × 6 = 84
    assert P.choose_packing([5, 4])[0] == 9                     # one row of 9 beats two of 5


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_steps_give_the_unpacked_logits_and_gradient(family):
    """Several rows' suffixes in one row (their prefixes side by side in its cache, a 4-D mask, each
    row's own positions) give the logits and dL/dδ of the padded batch (float64, 1e-10), replaying or
    computing the blocks up to the layer, also after a request has left; the first build checks it."""
    model, tok = _model(family, torch.float64)
    arch = resolve_arch(model)
    batch = P.PromptRows(tok, REQS, [["{}"], ["The cat. {}", "I think that {}"]])
    runner = P.PrefixCache(model, arch, 1, batch, tok)
    assert P._CHECKED[model][3] is True and runner.packs
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(len(REQS), model.config.hidden_size, generator=g, dtype=torch.float64)
    weights = torch.randn(len(batch.sel_rows), model.config.vocab_size, generator=g, dtype=torch.float64)
    for keep in (None, [0, 2, 3]):
        if keep:
            runner.select(keep)
            weights = weights[:len(runner.sel_rows_local)]
        packing = runner._build_packing(force=True)
        assert packing.ids.shape[0] < len(runner.rows)          # rows really share packed rows
        for mode in (("replay", "compute") if runner.replays else ("compute",)):
            results = []
            for p in (None, packing):
                d = delta.clone().requires_grad_(True)
                logits = runner._cached_forward(d, mode, packing=p)
                (logits * weights).sum().backward()
                results.append((logits.detach(), d.grad))
            (lu, gu), (lp, gp) = results
            torch.testing.assert_close(lp, lu, rtol=0, atol=1e-10)
            torch.testing.assert_close(gp, gu, rtol=0, atol=1e-10)
            assert gu.abs().sum() > 0
    # the builds after the first run the prefixes packed: their keys and values where they are read
    # (the rows' real prefix positions) are the unpacked ones
    assert runner._packed_prefix() is not None
    second = P.PrefixCache(model, arch, 1, batch, tok)
    seen = runner.prefix_mask.bool()[:, None, :, None]
    for a, b in zip(runner.base_cache.layers, second.base_cache.layers):
        torch.testing.assert_close(b.keys * seen, a.keys * seen, rtol=0, atol=1e-10)
        torch.testing.assert_close(b.values * seen, a.values * seen, rtol=0, atol=1e-10)
    torch.testing.assert_close(second.h0, runner.h0, rtol=0, atol=1e-10)


@pytest.mark.model
def test_batched_targets_equal_one_request_at_a_time_in_float64():
    """Each request's z, NLL and step count from one batch of four equal those of a batch of one
    (float64 model: the only difference is the padding, so ≤ 1e-6), with and without the cache."""
    model, tok = _model("llama", torch.float64)
    arch = resolve_arch(model)
    templates = generate_context_templates(model, tok, ("The", "I"), 3, seed=0)
    cfg = tiny_mose_config(v_num_grad_steps=12, v_loss_early_stop=0.0)
    together = T.compute_targets(model, tok, arch, 2, REQS, templates, cfg)
    for req, mine in zip(REQS, together):
        alone = T.compute_target(model, tok, arch, 2, req, templates, cfg)
        assert mine.steps == alone.steps
        torch.testing.assert_close(mine.z.double(), alone.z.double(), rtol=0, atol=1e-6)
        assert mine.nll == pytest.approx(alone.nll, abs=1e-6)
    assert len({round(float(t.z.norm()), 6) for t in together}) == 4     # four different targets


@pytest.mark.model
def test_a_request_stopping_early_leaves_the_others_targets_unchanged():
    """The early-stop level is set between the lowest starting loss and the others: that request
    stops at its first check and its rows leave the batch; every request's z, NLL and steps equal
    those it gets alone (float64)."""
    model, tok = _model("llama", torch.float64)
    arch = resolve_arch(model)
    templates = [["{}"], ["The cat. {}"]]
    start = [T.compute_target(model, tok, arch, 2, r, templates, tiny_mose_config(v_num_grad_steps=1)).nll
             for r in REQS]
    order = sorted(range(len(REQS)), key=lambda j: start[j])
    level = 0.5 * (start[order[0]] + start[order[1]])
    cfg = tiny_mose_config(v_num_grad_steps=10, v_loss_early_stop=level)
    alone = [T.compute_target(model, tok, arch, 2, r, templates, cfg) for r in REQS]
    assert alone[order[0]].steps == 1 and max(a.steps for a in alone) > 2
    together = T.compute_targets(model, tok, arch, 2, REQS, templates, cfg)
    for mine, ref in zip(together, alone):
        assert mine.steps == ref.steps
        torch.testing.assert_close(mine.z.double(), ref.z.double(), rtol=0, atol=1e-6)
        assert mine.nll == pytest.approx(ref.nll, abs=1e-6)


@pytest.mark.model
def test_per_request_adam_is_torch_adam():
    """The by-hand per-request Adam takes the steps torch.optim.Adam takes (one request, a
    quadratic loss stands in for the model: same update rule, bias correction and clamp-free)."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 7, generator=g, dtype=torch.float64)
    ref = torch.zeros(2, 7, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.3)
    mine = torch.zeros(2, 7, dtype=torch.float64, requires_grad=True)
    m, v, t = torch.zeros_like(mine), torch.zeros_like(mine), [0, 0]
    for _ in range(6):
        opt.zero_grad()
        ((ref - target) ** 4).sum().backward()
        opt.step()
        mine.grad = None
        ((mine - target) ** 4).sum().backward()
        with torch.no_grad():
            T._adam_step(mine, mine.grad, m, v, t, [0, 1], 0.3)
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.model
def test_target_same_with_and_without_cache(monkeypatch):
    model, tok = _model("llama")
    arch = resolve_arch(model)
    cfg = tiny_mose_config(v_num_grad_steps=6)
    templates = generate_context_templates(model, tok, ("The",), 3, seed=0)
    fast = T.compute_targets(model, tok, arch, 2, REQS[:2], templates, cfg)
    real_init = P.PrefixCache.__init__

    def disabled(self, *a, **k):
        real_init(self, *a, **k)
        self.usable = False
    monkeypatch.setattr(P.PrefixCache, "__init__", disabled)
    slow = T.compute_targets(model, tok, arch, 2, REQS[:2], templates, cfg)
    for f, s in zip(fast, slow):
        assert f.steps == s.steps
        torch.testing.assert_close(f.z, s.z, rtol=1e-4, atol=1e-5)
        assert f.nll == pytest.approx(s.nll, rel=1e-4)
    # the optimisation did something: the targets' NLL fell
    one = T.compute_targets(model, tok, arch, 2, REQS[:2], templates, tiny_mose_config(v_num_grad_steps=1))
    assert all(f.nll < o.nll for f, o in zip(fast, one))


@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefix_cache_is_accepted_for_low_precision_models(dtype):
    """The cached forward differs from the full one only by rounding in bf16/fp16: accepted."""
    model, tok = _model("llama", dtype)
    batch = P.PromptRows(tok, REQS[:2], [["{}"], ["The cat. {}"]])
    runner = P.PrefixCache(model, resolve_arch(model), 1, batch, tok)
    assert runner.usable
    assert P.prefix_cache_tolerance(dtype) < 0.1          # a wrong cache (O(1) off) is still refused


@pytest.mark.model
def test_target_respects_norm_clamp():
    model, tok = _model("llama")
    arch = resolve_arch(model)
    cfg = tiny_mose_config(v_num_grad_steps=10, clamp_norm_factor=0.05, v_lr=5.0)
    for res in T.compute_targets(model, tok, arch, 2, REQS[:2], [["{}"]], cfg):
        assert float((res.z - res.h0).norm()) <= 0.05 * float(res.h0.norm()) * (1 + 1e-5)


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_no_deprecated_transformers_arguments(family):
    """The prefix cache goes through transformers' current cache API: no FutureWarning."""
    import warnings
    model, tok = _model(family)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        T.compute_targets(model, tok, resolve_arch(model), 1, REQS[:1], [["{}"], ["The cat. {}"]],
                          tiny_mose_config(v_num_grad_steps=2))
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]


@pytest.mark.model
def test_targets_in_chunks_equal_one_batch():
    """target_batch only splits the work: chunks of 2 give each request the target one batch of 4
    gives it (float64)."""
    model, tok = _model("llama", torch.float64)
    arch = resolve_arch(model)
    templates = [["{}"], ["The cat. {}"]]
    whole = T.compute_targets(model, tok, arch, 2, REQS, templates,
                              tiny_mose_config(v_num_grad_steps=6, target_batch=4))
    parts = T.compute_targets(model, tok, arch, 2, REQS, templates,
                              tiny_mose_config(v_num_grad_steps=6, target_batch=2))
    for a, b in zip(whole, parts):
        assert a.steps == b.steps
        torch.testing.assert_close(a.z.double(), b.z.double(), rtol=0, atol=1e-6)


@pytest.mark.model
def test_step_precision_runs_the_products_in_bfloat16_with_eager_attention_and_restores_it():
    """Under ``step_precision(model, "bfloat16")`` a float32 model's logits are bf16 products (off
    the float32 ones by bf16 rounding, not more), attention is eager while it lasts and the model's
    own implementation afterwards — also after an error; float64 and bf16 models are left alone."""
    model, tok = _model("llama")
    model.set_attn_implementation("sdpa")
    batch = pad_batch(tok, [tok(REQ.text)["input_ids"]])
    with torch.no_grad():
        ref = model(**batch).logits
    with T.step_precision(model, "bfloat16") as precision:
        assert model.config._attn_implementation == "eager"
        with precision(), torch.no_grad():
            low = model(**batch).logits
    assert model.config._attn_implementation == "sdpa"
    err = float((low.float() - ref).abs().max() / ref.abs().max())
    assert 1e-4 < err < 5e-2, err
    with pytest.raises(RuntimeError, match="boom"):
        with T.step_precision(model, "bfloat16"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    for dtype in (torch.float64, torch.bfloat16):
        other, _ = _model("llama", dtype)
        with T.step_precision(other, "bfloat16") as precision:
            with precision():
                assert not torch.is_autocast_enabled("cpu")
    with T.step_precision(model, None) as precision:
        with precision():
            assert not torch.is_autocast_enabled("cpu")


@pytest.mark.model
def test_bfloat16_targets_keep_h0_exact_and_reach_the_target():
    """bf16 steps change δ's path by rounding only: h0 is the float32 model's to the bit, and the
    final NLL is within a few percent of the float32 optimisation's."""
    model, tok = _model("llama")
    arch = resolve_arch(model)
    templates = [["{}"], ["The cat. {}"]]
    # a first build checks the prefix cache unpacked; the builds after it pack the prefixes (which
    # rounds differently in float32): both runs below are such builds
    T.compute_targets(model, tok, arch, 2, REQS[:2], templates, tiny_mose_config(v_num_grad_steps=1))
    f32 = T.compute_targets(model, tok, arch, 2, REQS[:2], templates, tiny_mose_config(v_num_grad_steps=10))
    b16 = T.compute_targets(model, tok, arch, 2, REQS[:2], templates,
                            tiny_mose_config(v_num_grad_steps=10, target_dtype="bfloat16"))
    for a, b in zip(f32, b16):
        assert torch.equal(a.h0, b.h0)
        assert not torch.equal(a.z, b.z)
        assert float((a.z - b.z).norm() / (a.z - a.h0).norm()) < 0.1
        assert b.nll == pytest.approx(a.nll, rel=0.1, abs=1e-3)


@pytest.mark.model
def test_stopping_on_the_nll_stops_at_the_first_step_below_the_level():
    """With ``v_stop_on`` "nll" a request stops at the first step whose target NLL is below the
    level, even where the KL term keeps the loss above it: the NLL after each step comes from runs
    capped at that many steps (float64, no early stop), the level is set between two of them."""
    model, tok = _model("llama", torch.float64)
    arch = resolve_arch(model)
    templates = [["{}"], ["The cat. {}"]]
    KL = 5.0                                      # a KL term the size of the NLL's steps, as on real models
    capped = [T.compute_target(model, tok, arch, 2, REQS[1], templates,
                               tiny_mose_config(v_num_grad_steps=k, v_loss_early_stop=0.0, kl_factor=KL))
              for k in range(1, 9)]
    nll = [c.nll for c in capped]                 # nll[k - 1]: after k - 1 Adam steps
    k = min(i for i in range(3, len(nll) - 2) if nll[i] < min(nll[:i]))  # a new lowest NLL after k steps
    level = 0.5 * (min(nll[:k]) + nll[k])
    got = T.compute_target(model, tok, arch, 2, REQS[1], templates,
                           tiny_mose_config(v_num_grad_steps=8, v_loss_early_stop=level, v_stop_on="nll", kl_factor=KL))
    assert got.steps == k + 1 and got.nll == pytest.approx(nll[k], abs=1e-9)
    torch.testing.assert_close(got.z, capped[k].z, rtol=0, atol=1e-9)
    on_loss = T.compute_target(model, tok, arch, 2, REQS[1], templates,
                               tiny_mose_config(v_num_grad_steps=8, v_loss_early_stop=level, v_stop_on="loss",
                                                kl_factor=KL))
    assert on_loss.steps > got.steps              # the KL and decay terms hold the loss above the level


@pytest.mark.model
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_low_precision_weight_copies_give_the_autocast_steps(family):
    """The bf16 copies the steps run on (``low_precision_weights``: every linear weight above the
    layer and lm_head's, nothing below) give exactly the logits and dL/dδ of autocast's own casts."""
    model, tok = _model(family)
    arch = resolve_arch(model)
    low = T.low_precision_weights(model, arch, 1, torch.bfloat16)
    params = dict(model.named_parameters())
    assert low and all(w.dtype == torch.bfloat16 for w in low.values())
    assert all(torch.equal(w, params[n].to(torch.bfloat16)) for n, w in low.items() if n in params)
    assert f"{arch.lm_head}.weight" in low
    blocks = {int(n[len(arch.layers) + 1:].split(".")[0]) for n in low if n.startswith(arch.layers + ".")}
    assert blocks == set(range(2, arch.num_layers(model)))
    runner = P.PrefixCache(model, arch, 1, P.PromptRows(tok, REQS[:2], [["{}"], ["The cat. {}"]]), tok, low_weights=low)
    delta = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = []
    with T.step_precision(model, "bfloat16") as precision:
        for weights in (low, {}):
            runner.low_weights = weights
            d = delta.clone().requires_grad_(True)
            with precision():
                logits = runner.logits(d)
            logits.float().sum().backward()
            got.append((logits.detach(), d.grad))
    (la, ga), (lb, gb) = got
    assert la.dtype == torch.bfloat16
    assert torch.equal(la, lb) and torch.equal(ga, gb)


@pytest.mark.model
def test_prefix_cache_above_the_layer_is_computed_in_the_steps_precision():
    """With bf16 steps the prefix's keys and values up to the layer are the float32 ones to the bit
    (the replayed blocks read them) and those above are bf16 products, within bf16 rounding of them."""
    model, tok = _model("llama")
    arch = resolve_arch(model)
    batch = P.PromptRows(tok, REQS[:2], [["{}"], ["The cat. {}"]])
    P.PrefixCache(model, arch, 1, batch, tok)        # the first build (its checks): the two below are alike
    exact = P.PrefixCache(model, arch, 1, batch, tok)
    mixed = P.PrefixCache(model, arch, 1, batch, tok,
                          low_weights=T.low_precision_weights(model, arch, 1, torch.bfloat16))
    assert mixed.usable and mixed.replays
    torch.testing.assert_close(mixed.h0, exact.h0, rtol=0, atol=0)
    for k, (a, b) in enumerate(zip(exact.base_cache.layers, mixed.base_cache.layers)):
        if k <= 1:
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        else:
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                err = float((y.float() - x).abs().max() / x.abs().max())
                assert 0 < err < 2e-2, (k, err)
            assert b.values.dtype == torch.bfloat16        # a bf16 product (the keys pass float32 rotary)


def test_chunks_are_as_even_as_possible():
    from mose_fast.memit.targets import even_chunks
    for n, size in ((100, 16), (10, 16), (16, 16), (17, 16), (1, 16), (33, 16), (97, 10)):
        sizes = [c.stop - c.start for c in even_chunks(n, size)]
        assert sum(sizes) == n and max(sizes) <= size and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-n // size)                       # no more chunks than needed
        assert [c.start for c in even_chunks(n, size)] == [sum(sizes[:i]) for i in range(len(sizes))]


@pytest.mark.model
@pytest.mark.parametrize("stop_on", ["nll", "loss"])
def test_batched_cached_targets_equal_the_plain_reference(stop_on):
    """Four requests optimised together (prefix cache, replayed blocks, per-request Adam, one request
    stopping early) give each request the z, NLL and step count of ``naive.naive_target``: one
    request, whole prompts through the whole model, torch.optim.Adam (float64, clamp reached)."""
    model, tok = _model("llama", torch.float64)
    arch = resolve_arch(model)
    templates = generate_context_templates(model, tok, ("The", "I"), 3, seed=0)
    probe = tiny_mose_config(v_num_grad_steps=1, v_stop_on=stop_on)
    start = sorted(naive_target(model, tok, arch, 2, r, templates, probe).nll for r in REQS)
    cfg = tiny_mose_config(v_num_grad_steps=10, v_stop_on=stop_on, clamp_norm_factor=0.05,
                           v_loss_early_stop=0.5 * (start[0] + start[1]), target_dtype=None)
    fast = T.compute_targets(model, tok, arch, 2, REQS, templates, cfg)
    plain = [naive_target(model, tok, arch, 2, r, templates, cfg) for r in REQS]
    assert sorted(p.steps for p in plain)[0] == 1 and max(p.steps for p in plain) == 10
    assert any(float((p.z - p.h0).norm()) >= 0.05 * float(p.h0.norm()) * (1 - 1e-9) for p in plain)   # clamped
    for f, p in zip(fast, plain):
        assert f.steps == p.steps
        torch.testing.assert_close(f.h0.double(), p.h0.double(), rtol=0, atol=1e-9)
        torch.testing.assert_close(f.z.double(), p.z.double(), rtol=0, atol=1e-6)
        assert f.nll == pytest.approx(p.nll, abs=1e-6)

"""MOSEConfig.modules through the editor: validation, units in forward order, every rotated matrix
keeps its spectrum, all-or-nothing and exact undo across every edited matrix (rotated biases and
fused layouts included), state_dict, statistics from one pass — on tiny random models of every
family."""
import pytest
import torch

from mose_fast import EditRequest, MOSEConfig, MOSEEditor
from mose_fast.hf.arch import resolve_arch, unit_weights
from mose_fast.hf.hooks import capture_outputs
from mose_fast.memit import stats as stats_mod
from mose_fast.memit.keys import unit_keys_and_outputs
from mose_fast.rules import MODULES
from mose_fast.rules.mose_attn import QKKeys

from helpers import CORPUS, FAMILIES, make_tiny_model, tiny_mose_config

ALL = ("attn.qk", "attn.v", "mlp.in", "mlp.down")
REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")
REQ2 = EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")
REQ3 = EditRequest("The capital of France is", "France", "Rome", target_true="Paris")
FAST = dict(v_num_grad_steps=3, context_template_length=2, context_template_prefixes=("The",))


def unit_statistics(model, tok, layers, modules):
    """Every module's statistics on the test corpus (one pass), C0 split off as the editor takes it."""
    stats, _ = stats_mod.compute_unit_statistics(model, tok, resolve_arch(model), {m: list(layers) for m in modules},
                                                 CORPUS, 400, 32, 4, progress=False)
    C0 = {l: st["C0"] for l, st in stats.pop("mlp.down", {}).items()}
    return C0 or None, stats


def unit_editor(family="llama", modules=ALL, dtype=torch.float64, **cfg):
    """A tiny model of ``family`` (in ``dtype``) and an editor rotating ``modules`` at layers 1-2.
    The projections' biases (zero from HF's init) are made random, so that a rotated bias shows."""
    model, tok = make_tiny_model(family)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor) and type(m).__name__ in ("Linear", "Conv1D"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model = model.to(dtype)
    config = tiny_mose_config(modules=modules, **{**FAST, **cfg})
    C0, stats = unit_statistics(model, tok, config.layers, modules)
    return MOSEEditor(model, tok, config, second_moments=C0, statistics=stats, progress=False), model, tok


def edited_matrices(editor) -> dict[str, torch.Tensor]:
    """Every matrix the editor's modules rotate, as float64 copies: "module.layer.name"."""
    out = {}
    for l, m in editor.units():
        if m == "mlp.down":
            out[f"mlp.down.{l}.down"] = editor.arch.weight_view(editor.model, l).double().clone()
        else:
            for n, W in unit_weights(editor.model, editor.arch, l, m).matrices().items():
                out[f"{m}.{l}.{n}"] = W.double().clone()
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def rule_states(editor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.state_dict().items() if k.startswith("rule.")}


def assert_same_spectrum(W0: torch.Tensor, W1: torch.Tensor, name: str, rtol: float = 1e-6) -> None:
    s0, s1 = torch.linalg.svdvals(W0), torch.linalg.svdvals(W1)
    assert torch.allclose(s1, s0, rtol=rtol, atol=rtol * float(s0[0])), (name, (s1 - s0).abs().max())
    f0, f1 = float(W0.norm()), float(W1.norm())
    assert abs(f1 / f0 - 1) < rtol, (name, f0, f1)


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field, message", [
    (dict(modules=[]), "modules", "non-empty"),
    (dict(modules="mlp.in"), "modules", "non-empty"),
    (dict(modules=["mlp.up"]), "modules", "unknown module"),
    (dict(modules=["mlp.in", "mlp.in"]), "modules", "twice"),
    (dict(modules=["attn.v", "mlp.down"], method="memit", rule_hparams={}, land_retries=0), "modules", "method 'mose'"),
    (dict(module_hparams={"attn.v": {}}), "module_hparams", "does not select"),
    (dict(modules=["mlp.down"], module_hparams={"mlp.down": {}}), "module_hparams", "rule_hparams"),
    (dict(modules=["mlp.in"], module_hparams={"mlp.in": {"poly_degree": 0}}), "module_hparams['mlp.in'].poly_degree",
     "degree"),
    (dict(modules=["attn.qk"], module_hparams={"attn.qk": {"depth": 3}}), "module_hparams['attn.qk']",
     "unknown option"),
    (dict(modules=["attn.qk"], module_hparams={"attn.qk": {"ridge": -1.0}}), "module_hparams['attn.qk'].ridge",
     "ridge"),
])
def test_module_validation_errors_name_the_field(overrides, field, message):
    with pytest.raises(ValueError) as e:
        MOSEConfig.preset("mose", **overrides)
    assert field in str(e.value) and message in str(e.value), str(e.value)


def test_modules_serialise_and_the_default_reads_as_before():
    cfg = MOSEConfig.preset("mose", modules=["attn.qk", "mlp.down"], module_hparams={"attn.qk": {"ridge": 1e-2}})
    assert cfg.modules == ("attn.qk", "mlp.down")
    d = cfg.to_dict()
    assert d["modules"] == ["attn.qk", "mlp.down"] and d["module_hparams"] == {"attn.qk": {"ridge": 1e-2}}
    again = MOSEConfig.from_dict(d)
    assert again.modules == cfg.modules and again.module_hparams == cfg.module_hparams
    default = MOSEConfig.preset("mose")
    assert default.modules == ("mlp.down",)
    assert "modules" not in default.to_dict() and "module_hparams" not in default.to_dict()


def test_module_rules_take_lam_from_the_config_unless_their_options_say_otherwise():
    from mose_fast.rules import make_unit_rule
    cfg = MOSEConfig.preset("mose", modules=ALL, lam=0.5,
                            module_hparams={"attn.v": {"lam": 2.0, "lam_unit": "absolute"}, "mlp.in": {"lam": 0.0}})
    assert cfg.rule_hparams["lam_unit"] == "per_dim"
    qk, v, ffn = (make_unit_rule(cfg, m) for m in ("attn.qk", "attn.v", "mlp.in"))
    assert (qk.lam, qk.lam_unit) == (0.5, "per_dim")
    assert (v.lam, v.lam_unit) == (2.0, "absolute")
    assert (ffn.lam, ffn.lam_unit) == (0.0, "per_dim")


# --- the edit -------------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_units_in_forward_order_rotate_only_their_matrices_and_keep_every_spectrum(family):
    editor, model, tok = unit_editor(family)
    before, M0 = params(model), edited_matrices(editor)
    units = [(l, m) for l in (1, 2) for m in ALL]
    assert editor.units() == units
    for req in (REQ, REQ2):
        rec = editor.edit(req)
        assert [(r.layer, r.module) for r in rec.layers] == units
        for r in rec.layers:
            assert r.orth_error < 1e-12, (r.module, r.orth_error)
            assert r.objective <= r.objective_identity + 1e-9, (r.module, r.objective, r.objective_identity)
            assert r.weight_norm_after == pytest.approx(r.weight_norm_before, rel=1e-12)
            assert (r.poly_remainder is not None) == (r.module == "mlp.in")
            assert r.gap is not None and r.gap > 0
    after, M1 = params(model), edited_matrices(editor)
    written = {n for l, m in units for n in editor.arch.unit_params(model, l, m)}
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.endswith("bias") and name not in written:
            assert not changed, name
        elif name not in written:
            assert not changed, f"{name} changed but no module writes it"
        elif name.endswith("weight"):
            assert changed, f"{name} is a rotated weight and did not change"
    for name in M0:
        assert_same_spectrum(M0[name], M1[name], name, rtol=1e-10)
    # the mlp.in remainder is a finite share of the residual
    assert all(0 <= r.poly_remainder < 10 for r in rec.layers if r.module == "mlp.in")
    assert set(editor.unit_spectra()) == {n for n in M1 if not n.startswith("mlp.down")}


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_failed_edit_and_undo_leave_every_matrix_bit_identical(monkeypatch, family):
    """A failure inside the 6th unit's update (layer 2's attn.v, after it wrote its weights) puts
    every parameter back bit for bit — rotated biases and fused layouts included — and every rule
    state; undo then takes the kept edits back out, bit for bit in the weights."""
    editor, model, tok = unit_editor(family)
    editor.prepare()
    P0, S0 = params(model), rule_states(editor)
    editor.edit(REQ)
    P1, S1 = params(model), rule_states(editor)
    calls = []
    real = editor.rules["attn.v"].update

    def failing(layer, W, K, resid, edit_weights=None):
        calls.append(layer)
        res = real(layer, W, K, resid, edit_weights=edit_weights)
        if layer == 2:
            raise RuntimeError("injected failure in the sixth unit")
        return res
    monkeypatch.setattr(editor.rules["attn.v"], "update", failing)
    with pytest.raises(RuntimeError, match="injected"):
        editor.edit(REQ2)
    assert calls == [1, 2]
    for k, v in params(model).items():
        assert torch.equal(P1[k], v), k
    for k, v in rule_states(editor).items():
        assert torch.equal(S1[k], v), k
    assert editor.n_edits == 1 and len(editor.records) == 1
    monkeypatch.undo()
    editor.edit(REQ2)
    editor.undo(2)
    for k, v in params(model).items():
        assert torch.equal(P0[k], v), k
    for k, v in rule_states(editor).items():      # states are rotated back: to rounding
        torch.testing.assert_close(v, S0[k], rtol=1e-10, atol=1e-10 * float(S0[k].abs().max()))


@pytest.mark.model
def test_float32_masters_for_half_precision_modules_and_exact_undo():
    editor, model, tok = unit_editor("qwen2", dtype=torch.bfloat16)
    editor.prepare()
    assert editor._pmaster and all(m.dtype == torch.float32 for m in editor._pmaster.values())
    P0 = params(model)
    masters0 = {k: v.clone() for k, v in editor._pmaster.items()}
    editor.edit(REQ)
    named = dict(model.named_parameters())
    for n, m in editor._pmaster.items():         # each parameter is its master, rounded once
        assert torch.equal(named[n].data, m.to(torch.bfloat16)), n
    editor.undo(1)
    for k, v in params(model).items():
        assert torch.equal(P0[k], v), k
    for k, v in editor._pmaster.items():
        assert torch.equal(masters0[k], v), k


@pytest.mark.model
def test_land_retries_resolve_every_unit(monkeypatch):
    editor, model, tok = unit_editor("llama", land_retries=1)
    answers = iter([[False], [True]])
    monkeypatch.setattr(editor, "_landed", lambda requests: next(answers))
    rec = editor.edit(REQ)
    assert rec.attempts == 2 and rec.edit_weights == [editor.cfg.land_boost]
    n = len(editor.units())
    assert [r.attempt for r in rec.layers] == [0] * n + [1] * n
    assert [(r.layer, r.module) for r in rec.layers[n:]] == editor.units()


@pytest.mark.model
def test_state_dict_prefixes_each_module_and_a_restored_editor_continues_identically():
    editor, model, tok = unit_editor("gpt2")
    editor.edit(REQ)
    state = {k: v.clone() for k, v in editor.state_dict().items()}
    assert {"rule.P.1", "rule.P.2", "weight.1", "weight.2"} <= set(state)      # mlp.down's keys as before
    for m, key in (("attn.v", "P"), ("attn.qk", "P"), ("mlp.in", "C"), ("mlp.in", "coef"), ("mlp.in", "scale")):
        assert f"rule.{m}.{key}.1" in state and f"rule.{m}.{key}.2" in state, (m, key)
    assert "param.transformer.h.1.attn.c_attn.bias" in state and "param.transformer.h.2.mlp.c_fc.weight" in state
    # a second editor on a fresh copy of the model, restored from the state, continues bit for bit
    other, model2, _ = unit_editor("gpt2")
    other.prepare()
    other.load_state_dict(state)
    for k, v in params(model).items():
        assert torch.equal(v, dict(model2.named_parameters())[k].data), k
    editor.edit(REQ2)
    other.edit(REQ2)
    for k, v in params(model).items():
        assert torch.equal(v, dict(model2.named_parameters())[k].data), k


@pytest.mark.model
def test_default_modules_keep_the_state_keys_and_records():
    editor, model, tok = unit_editor("llama", modules=("mlp.down",))
    rec = editor.edit(REQ)
    assert editor.units() == [(1, "mlp.down"), (2, "mlp.down")]
    assert {r.module for r in rec.layers} == {"mlp.down"} and all(r.poly_remainder is None for r in rec.layers)
    assert set(editor.state_dict()) == {"n_edits", "weight.1", "weight.2", "rule.P.1", "rule.P.2"}
    assert editor.rule is editor.rules["mlp.down"]


@pytest.mark.model
def test_modules_without_mlp_down():
    editor, model, tok = unit_editor("mistral", modules=("attn.v", "mlp.in"))
    down = {l: editor.arch.weight_view(model, l).clone() for l in (1, 2)}
    rec = editor.edit(REQ)
    assert [(r.layer, r.module) for r in rec.layers] == [(1, "attn.v"), (1, "mlp.in"), (2, "attn.v"), (2, "mlp.in")]
    assert editor.rule is None and not any(k.startswith("weight.") for k in editor.state_dict())
    for l in (1, 2):
        assert torch.equal(editor.arch.weight_view(model, l), down[l])


@pytest.mark.model
@pytest.mark.parametrize("module", ["attn.v", "mlp.in"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_unit_moves_its_own_output_towards_its_residual(family, module):
    """At the edit's own position (bare prompt, no context templates, small λ), the change of the
    unit's output (attention / FFN output) after its update is closer to the residual it was given
    than no change, and points its way — for small and for large residuals."""
    from mose_fast.hf.tokens import subject_last_index
    editor, model, tok = unit_editor(family, modules=(module,), lam=0.01, context_template_prefixes=())
    editor.prepare()
    arch = editor.arch
    out = arch.sub(model, 1, arch.attn_out if module == "attn.v" else arch.mlp_out.rsplit(".", 1)[0])
    ids, pos = subject_last_index(tok, REQ.template, REQ.subject)

    def output():
        with capture_outputs({"y": out}) as seen:
            model(input_ids=torch.tensor([ids]))
        return seen["y"][0][0, pos].double()
    y0 = output()
    K, _ = unit_keys_and_outputs(model, tok, arch, 1, module, 2, [REQ], editor.context_templates())
    P0 = params(model)
    gen = torch.Generator().manual_seed(0)
    d_model = model.config.hidden_size
    for scale in (0.06, 0.9):
        r = torch.randn(d_model, 1, generator=gen, dtype=torch.float64) * float(y0.norm()) * scale / d_model ** 0.5
        editor.rules[module].update(1, editor.unit_weights(1, module), K.T.double(), r)
        d = output() - y0
        cos = float(d @ r[:, 0] / (d.norm() * r.norm()))
        assert float((d - r[:, 0]).norm()) < 0.99 * float(r.norm()) and cos > 0.2, (scale, cos)
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(P0[k])


# --- 100 sequential rotations per module -----------------------------------------------------------

def _random_keys(editor, layer, module, gen, real):
    """Keys like the edit's own (from ``real``) but random in direction; and a random residual."""
    d = editor.model.config.hidden_size
    if module == "attn.qk":
        scale = real.q.norm() / real.q.shape[0] ** 0.5
        q = torch.randn(real.q.shape, generator=gen, dtype=torch.float64) * scale
        J = torch.randn(real.J.shape, generator=gen, dtype=torch.float64) * real.J.std()
        keys = QKKeys(q=q, J=J)
    else:
        K = real.T.to(torch.float64)
        keys = torch.randn(K.shape, generator=gen, dtype=torch.float64) * (K.norm() / K.shape[0] ** 0.5)
    resid = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    return keys, resid


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_100_sequential_rotations_keep_norm_and_every_singular_value(family):
    """Every module's rule driven directly for 100 updates (random keys and residuals of the edit
    keys' scale, each committed): q, k, v, gate/up or in, and down keep ‖W‖_F and every singular
    value to 1e-6 (float64 model; they actually hold to ~1e-12)."""
    editor, model, tok = unit_editor(family, lam=0.3)
    editor.prepare()
    templates = editor.context_templates()
    M0 = edited_matrices(editor)
    gen = torch.Generator().manual_seed(0)
    real = {(l, m): unit_keys_and_outputs(model, tok, editor.arch, l, m, 2, [REQ], templates)[0]
            for l, m in editor.units()}
    moved = set()
    for step in range(100):
        for l, m in editor.units():
            keys, resid = _random_keys(editor, l, m, gen, real[(l, m)])
            W = editor.weight(l) if m == "mlp.down" else editor.unit_weights(l, m)
            res = editor.rules[m].update(l, W, keys, resid * (0.5 if m == "mlp.down" else 2.0))
            editor.rules[m].commit(l, res.undo)
            assert res.orth_error < 1e-12, (step, m, res.orth_error)
    M1 = edited_matrices(editor)
    for name in M0:
        assert_same_spectrum(M0[name], M1[name], name, rtol=1e-6)
        if not torch.allclose(M0[name], M1[name], atol=1e-3):
            moved.add(name.split(".")[0] + "." + name.split(".")[1])
    assert moved == set(ALL), moved          # every module really rotated its matrices


# --- statistics -------------------------------------------------------------------------------------

@pytest.mark.model
def test_one_statistics_pass_gives_c0_bit_for_bit_and_caches_each_statistic(tmp_path, monkeypatch):
    model, tok = make_tiny_model("gpt_neox")
    arch = resolve_arch(model)
    kw = dict(n_tokens=200, seq_len=32, batch_size=4, cache_dir=tmp_path, progress=False)
    units = {m: [1, 2] for m in MODULES}
    got = stats_mod.unit_statistics(model, tok, arch, units, CORPUS, **kw)
    c0, _ = stats_mod.compute_second_moments(model, tok, arch, [1, 2], CORPUS, 200, 32, 4, progress=False)
    for l in (1, 2):
        assert torch.equal(got["mlp.down"][l]["C0"], c0[l])
    names = sorted(p.name.split("_")[0] for p in tmp_path.glob("*.safetensors"))
    assert names == sorted(["C0", "Cu", "Cqk", "Cx"] * 2)
    # C0 through unit_statistics is the very file key_second_moments reads
    calls = []
    monkeypatch.setattr(stats_mod, "compute_second_moments", lambda *a, **k: calls.append(1))
    again = stats_mod.key_second_moments(model, tok, arch, [1, 2], CORPUS, **kw)
    assert not calls and all(torch.equal(again[l], c0[l]) for l in (1, 2))
    real = stats_mod.compute_unit_statistics
    monkeypatch.setattr(stats_mod, "compute_unit_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = stats_mod.unit_statistics(model, tok, arch, units, CORPUS, **kw)
    assert not calls
    for m in units:
        for l in (1, 2):
            for k, v in got[m][l].items():
                assert torch.equal(cached[m][l][k], v), (m, l, k)
    # shapes: Cu d_q², Cqk d_kv², Cx d_model², a histogram of the pre-activations
    st = got["mlp.in"][1]
    assert st["Cx"].shape == (32, 32) and got["attn.v"][1]["Cu"].shape == (32, 32)
    assert got["attn.qk"][1]["Cqk"].shape == (32, 32)
    assert float(st["hist_counts"].sum()) == 200 * 64        # every token × every FFN unit


# --- the evaluation harness -----------------------------------------------------------------------

@pytest.mark.model
def test_a_run_with_every_module_resumes_exactly_and_journals_the_units(tmp_path, monkeypatch):
    """run_eval with modules = all four, killed during its 3rd edit and resumed in a fresh process,
    ends with the same weights as an uninterrupted run; the journal has every unit's record and
    the other modules' spectra at the evaluation points."""
    import json

    from mose_fast.eval import runner
    data = tmp_path / "data"
    (data / "glue").mkdir(parents=True)
    (data / "wikitext-2").mkdir()
    (data / "glue" / "sst2.json").write_text(json.dumps([{"sentence": s, "label": i % 2, "idx": i}
                                                         for i, s in enumerate(CORPUS[:6])]))
    (data / "wikitext-2" / "test.txt").write_text(" ".join(CORPUS))
    settings = runner.EvalSettings(eval_every=2, glue_n=6, ppl_tokens=100, data_dir=str(data))
    reqs = [EditRequest(r.prompt, r.subject, r.target_new, target_true=r.target_true, case_id=i,
                        neighborhood_prompts=["Paris is in"], neighborhood_answers=["France"])
            for i, r in enumerate([REQ, REQ2, REQ3, REQ])]

    def fresh():
        editor, model, tok = unit_editor("qwen2")
        real_init = MOSEEditor.__init__
        C0, stats = editor._second_moments, editor._statistics

        def init(self, *a, **k):     # the precomputed statistics (no WikiText corpus in tests)
            real_init(self, *a, **{**k, "second_moments": C0, "statistics": stats})
        monkeypatch.setattr(MOSEEditor, "__init__", init)
        return model, tok, editor.cfg
    model, tok, cfg = fresh()
    runner.run_eval(model, tok, reqs, cfg, tmp_path / "ref", settings, "tiny", progress=False)
    ref = params(model)
    monkeypatch.undo()

    model, tok, cfg = fresh()
    real_edit, calls = MOSEEditor.edit, []

    def dying(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_edit(self, batch)
    monkeypatch.setattr(MOSEEditor, "edit", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, reqs, cfg, tmp_path / "run", settings, "tiny", progress=False)
    monkeypatch.undo()
    model, tok, cfg = fresh()
    rep = runner.run_eval(model, tok, reqs, cfg, tmp_path / "run", settings, "tiny", progress=False)
    for k, v in params(model).items():
        assert torch.equal(v, ref[k]), k
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 1, 2, 3]
    units = [[l, m] for l in (1, 2) for m in ALL]
    assert all([[r["layer"], r["module"]] for r in e["layers"]] == units for e in journal)
    assert [("unit_spectra" in e) for e in journal] == [False, True, False, True]
    assert all(abs(s["fro"]) > 0 for s in journal[-1]["unit_spectra"].values())
    assert rep["config"]["modules"] == list(ALL)

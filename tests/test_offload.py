"""Rule state kept on the host, one layer's on the device per rule call (mose_fast.offload), and the
undo copies' pinning.  On the CPU the "device" copy of a layer's state is a clone, so the mechanism
runs here as it does on a GPU: the edits must come out bit for bit as with the state left in place,
only the layer being solved may have its state away from the host copies, and the memory plan's
"one layer on the device, every layer on the host" must be the bytes this editor holds."""
from __future__ import annotations

import pytest
import torch

from mose_fast import EditRequest, MOSEConfig, MOSEEditor
from mose_fast.offload import RuleStateHome, layer_state

from helpers import make_tiny_model, tiny_mose_config, tiny_second_moments

REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French"),
        EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")]


class _Rule:
    def __init__(self):
        self.a = {0: torch.arange(4.0), 1: torch.ones(3)}
        self.b = {0: torch.zeros(2), 1: torch.zeros(2)}
        self.scale = {0: 2.0}            # not a tensor: left alone


def test_state_home_copies_back_only_what_a_call_changed():
    rule, home = _Rule(), RuleStateHome(pin=True)
    host_a0, host_b0, host_a1 = rule.a[0], rule.b[0], rule.a[1]
    with home.on_device(rule, 0, torch.device("cpu")):
        assert rule.a[0] is not host_a0 and torch.equal(rule.a[0], host_a0)     # the layer's "device" copy
        assert rule.a[1] is host_a1                                              # other layers stay home
        rule.b[0].add_(5.0)                       # changed in place on the device copy
        rule.a[0].sum()                           # read only
        rule.b[2] = torch.ones(1)                 # another layer: not this call's business
    assert rule.a[0] is host_a0                   # unchanged: the host copy again, no transfer
    assert rule.b[0] is not host_b0 and torch.equal(rule.b[0], torch.full((2,), 5.0))
    assert torch.equal(host_b0, torch.zeros(2))   # the old host copy is not written in place
    assert rule.scale == {0: 2.0}
    with pytest.raises(RuntimeError):
        with home.on_device(rule, 1, torch.device("cpu")):
            rule.a[1] = rule.a[1] * 3             # replaced, then the call fails
            raise RuntimeError("solve failed")
    assert torch.equal(rule.a[1], torch.full((3,), 3.0))       # back on the host whatever happened
    assert layer_state(rule, 0).keys() == {"a", "b"}


def _editor(model, tok, cfg, second, offload):
    return MOSEEditor(model, tok, cfg, second_moments={l: c.clone() for l, c in second.items()}, progress=False,
                      offload_rule_state=offload)


def _cfg(dtype_name="float32"):
    return MOSEConfig.preset("mose", "llama", **{k: getattr(tiny_mose_config(), k) for k in (
        "stats_tokens", "stats_seq_len", "stats_batch_size", "v_num_grad_steps", "context_template_length",
        "context_template_prefixes")}, layers=[1, 2], land_retries=0)


@pytest.mark.model
def test_offloaded_editor_matches_the_resident_one_bit_for_bit_and_holds_one_layer_away():
    model, tok = make_tiny_model("llama")
    cfg = _cfg()
    second = tiny_second_moments(model, tok, cfg.layers)
    ref_model, _ = make_tiny_model("llama")
    ref = _editor(ref_model, tok, cfg, second, offload=False)
    off = _editor(model, tok, cfg, second, offload=True)
    off.prepare()
    home_ids: dict = {}
    away: list[tuple[int, set]] = []
    real_update = off.rule.update

    def update(layer, *a, **k):
        # during layer `layer`'s solve: its state is the device copy, every other layer's the host copy
        for l in cfg.layers:
            for name, t in layer_state(off.rule, l).items():
                if (name, l) in home_ids:
                    assert (t is home_ids[(name, l)]) == (l != layer), (name, l, layer)
        away.append((layer, {name for name, t in layer_state(off.rule, layer).items()
                             if t is not home_ids.get((name, layer))}))
        return real_update(layer, *a, **k)
    off.rule.update = update
    for i in range(3):
        home_ids = {(name, l): t for l in cfg.layers for name, t in layer_state(off.rule, l).items()}
        ref.edit(REQS)
        off.edit(REQS)
    ref.undo(1)
    off.undo(1)
    home_ids = {(name, l): t for l in cfg.layers for name, t in layer_state(off.rule, l).items()}
    ref.edit(REQS[:1])
    off.edit(REQS[:1])
    assert [l for l, _ in away] == cfg.layers * 4 and all({"chol", "cross", "wwt"} <= names for _, names in away)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, off.model.state_dict()[k]), k
    a, b = ref.rule.state_dict(), off.rule.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ref.rule_state_bytes() == off.rule_state_bytes()
    assert [r.layers[0].objective for r in ref.records] == [r.layers[0].objective for r in off.records]


@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_of_an_offloaded_job_is_this_editors_bytes(dtype):
    """device="cuda": the device stages hold one layer's state, the host every layer's — the bytes
    the offloading editor moves per rule call and keeps on the host."""
    from mose_fast.plan import plan
    model, tok = make_tiny_model("llama")
    model = model.to(dtype)
    cfg = _cfg()
    editor = _editor(model, tok, cfg, tiny_second_moments(model, tok, cfg.layers), offload=True)
    for _ in range(3):
        editor.edit(REQS)                      # 6 key columns in each layer's memory
    pl = plan("tiny", cfg, edits=6, batch=2, dtype=str(dtype).split(".")[1], device="cuda", config=model.config)
    assert pl.offload
    stages = {s.name: s for s in pl.stages}

    def held(l):   # as tests/test_plan.py counts: S is state where the last edit moved it, else built again
        st = layer_state(editor.rule, l)
        return sum(t.numel() * t.element_size() for t in st.values()) + (
            0 if "sgram" in st else editor.rule.wwt[l].numel() * 8)
    one = sum(v for k, v in stages["solve"].parts.items() if k.startswith("one layer's state"))
    assert one == max(held(l) for l in cfg.layers)
    for name in ("rule state", "targets"):     # between rule calls no layer's state is on the device
        assert not any(k.startswith("one layer") or "Cholesky" in k for k in stages[name].parts), name
    masters = sum(m.numel() * 4 for m in editor._master.values())
    assert stages["rule state"].parts["masters (float32)"] == masters
    assert pl.host.parts["rule state, every layer (pinned)"] == sum(held(l) for l in cfg.layers)
    # every tensor of the rule is on the host between edits
    assert all(t.device.type == "cpu" for l in cfg.layers for t in layer_state(editor.rule, l).values())


@pytest.mark.model
def test_statistics_one_layer_at_a_time_when_offloading(monkeypatch):
    import mose_fast.editor as editor_module
    model, tok = make_tiny_model("llama")
    cfg = _cfg()
    second = tiny_second_moments(model, tok, cfg.layers)
    groups = []

    def fake(model_, tok_, arch, layers, *a, **k):
        groups.append(list(layers))
        return {l: second[l].clone() for l in layers}
    monkeypatch.setattr(editor_module, "key_second_moments", fake)
    editor = MOSEEditor(model, tok, cfg, progress=False, offload_rule_state=True)
    editor._corpus = ["unused"]
    got = editor.second_moments()
    assert groups == [[1], [2]] and all(c.device.type == "cpu" for c in got.values())
    groups.clear()
    resident = MOSEEditor(model, tok, cfg, progress=False, offload_rule_state=False)
    resident._corpus = ["unused"]
    resident.second_moments()
    assert groups == [[1, 2]]


def test_offload_follows_the_device_and_the_environment(monkeypatch):
    """"auto" offloads on a GPU where the plan with every layer's state resident takes more than 90 % of
    the device (a stand-in device of 1 MiB), not where it fits (1 TiB), and never on the CPU."""
    from types import SimpleNamespace

    from mose_fast.plan import GiB, plan
    model, tok = make_tiny_model("llama")
    resident = plan("tiny", _cfg(), edits=10 ** 6, batch=_cfg().target_batch, dtype="float32", device="cuda",
                    config=model.config, offload=False).peak.total
    for total, want in ((resident // 2, True), (1024 * GiB, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, total=total: SimpleNamespace(total_memory=total))
        editor = MOSEEditor(model, tok, _cfg(), progress=False)
        assert editor.offloads(torch.device("cuda", 1)) is want and not editor.offloads(torch.device("cpu"))
    monkeypatch.setenv("MOSE_OFFLOAD_RULE_STATE", "0")
    assert not MOSEEditor(model, tok, _cfg(), progress=False).offloads(torch.device("cuda", 0))
    monkeypatch.setenv("MOSE_OFFLOAD_RULE_STATE", "sometimes")
    with pytest.raises(ValueError, match="MOSE_OFFLOAD_RULE_STATE"):
        MOSEEditor(model, tok, _cfg(), progress=False)


class _FakeCuda:
    """A stand-in for a CUDA tensor: what _host_copy reads of it."""
    device = torch.device("cuda", 0)

    def __init__(self, t):
        self._t = t
        self.shape, self.dtype = t.shape, t.dtype

    def detach(self):
        return self._t


@pytest.mark.parametrize("pin", [None, False, True])
def test_undo_copies_are_pinned_only_when_asked(monkeypatch, pin):
    from mose_fast import editor as editor_module
    asked = []
    real_empty = torch.empty

    def empty(*a, pin_memory=False, **k):
        asked.append(pin_memory)
        return real_empty(*a, **k)
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a GPU machine, as far as the copy knows
    src = torch.arange(6.0).reshape(2, 3)
    out = editor_module._host_copy(_FakeCuda(src)) if pin is None else editor_module._host_copy(_FakeCuda(src), pin)
    assert torch.equal(out, src) and out.device.type == "cpu"
    assert asked == [bool(pin)]

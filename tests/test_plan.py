"""The memory plan: built from the config alone, and its rule-state and weight figures equal the
bytes a real editor holds after the same edits (tiny model)."""
import json

import pytest
import torch

from mose_fast import EditRequest, MOSEConfig, MOSEEditor, cli
from mose_fast.plan import GiB, llama2_13b_config, llama3_8b_config, plan

from helpers import make_tiny_model, tiny_mose_config, tiny_second_moments

REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French"),
        EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")]


@pytest.mark.model
@pytest.mark.parametrize("preset, dtype", [("mose", torch.float32), ("mose", torch.bfloat16),
                                           ("mose-paper", torch.float32), ("alphaedit", torch.float32)])
def test_rule_state_and_weights_match_a_real_editor(preset, dtype):
    model, tok = make_tiny_model("llama")
    model = model.to(dtype)
    cfg = MOSEConfig.preset(preset, "llama", **{k: getattr(tiny_mose_config(), k) for k in (
        "stats_tokens", "stats_seq_len", "stats_batch_size", "v_num_grad_steps", "context_template_length",
        "context_template_prefixes")}, layers=[1, 2], land_retries=0)
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, cfg.layers), progress=False)
    for _ in range(3):
        editor.edit(REQS)                       # 3 edits of 2 requests: 6 key columns in the memory
    pl = plan("tiny", cfg, edits=6, batch=2, dtype=str(dtype).split(".")[1], device="cpu", config=model.config)
    stage = {s.name: s for s in pl.stages}["rule state"]
    assert stage.parts["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    masters = sum(m.numel() * 4 for m in editor._master.values())
    assert stage.parts["masters (float32)"] == masters and (masters > 0) == (dtype == torch.bfloat16)
    rule_parts = sum(v for k, v in stage.parts.items()
                     if k not in ("weights", "masters (float32)") and not k.startswith("host copies"))
    held = editor.rule.state_bytes()         # every tensor the rule holds per layer
    if preset == "mose":                       # S = W·C0⁻¹·Wᵀ is state where the last edit moved it, else
        held += sum(editor.rule.wwt[l].numel() * 8 for l in cfg.layers if l not in editor.rule.sgram)
    assert rule_parts == held
    targets = {s.name: s for s in pl.stages}["targets"].parts
    copies = targets.get("bf16 weight copies for the steps")
    if dtype == torch.float32:                 # exactly what the steps copy
        from mose_fast.memit.targets import low_precision_weights
        low = low_precision_weights(model, editor.arch, cfg.layers[-1], torch.bfloat16)
        assert copies == sum(w.numel() * w.element_size() for w in low.values())
    else:
        assert copies is None


def test_13b_plan_with_the_recommended_configuration_fits_40_gib():
    cfg = MOSEConfig.preset("mose", "llama")
    pl = plan("llama2-13b", cfg, edits=1000, batch=1, config=llama2_13b_config(), gpu_mem=48)
    assert pl.peak.total <= 40 * GiB and pl.fits()
    weights = {s.name: s for s in pl.stages}["weights"].total
    assert abs(weights / GiB - 24.24) < 0.05          # 13.0 B parameters in bf16
    small = plan("llama3-8b", MOSEConfig.preset("mose-paper", "llama"), edits=1000, config=llama3_8b_config(),
                 gpu_mem=16)
    assert small.fits() is False                       # 15 GiB of weights alone: refused


def test_plan_command_reads_only_the_config(tmp_path, capsys, monkeypatch):
    import mose_fast.hf.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    config = llama2_13b_config().to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    rc = cli.main(["plan", "--model", str(path), "--edits", "1000", "--gpu-mem", "48", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True and out["preset"] == "mose"
    assert set(out["stages"]) == {"weights", "statistics", "prepare", "rule state", "targets", "solve"}
    rc = cli.main(["plan", "--model", "llama2-13b", "--gpu-mem", "24"])
    assert rc == 1 and "does NOT fit" in capsys.readouterr().out

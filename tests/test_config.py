"""Configurations: every preset builds and validates, its rule can be built with its options,
``from_dict`` / ``from_json`` are a preset plus overrides, and a bad value is refused naming the
field (before any model is loaded)."""
import argparse
import dataclasses
import json

import pytest
import torch

from mose_fast.cli import _add_model, build_config
from mose_fast.config import FAMILIES, PAPER_LAM_PER_DIM, PRESETS, MOSEConfig, presets
from mose_fast.rules import RULES, AdditiveRule, MOSEInputRule, MOSERule, make_rule


def test_the_dataclass_defaults_are_the_mose_preset():
    assert MOSEConfig().to_dict() == MOSEConfig.preset("mose").to_dict()
    assert MOSEConfig(lam=2.0).preset_name == "mose" and MOSEConfig(lam=2.0).to_dict()["preset"] == "mose"
    json.dumps(MOSEConfig().to_dict())                     # what run.json and the journal store
    cfg = MOSEConfig()
    assert ((cfg.method, cfg.lam, cfg.polar_method, cfg.land_retries, cfg.preset_name)
            == ("mose", 1000 / 1536, "auto", 2, "mose"))
    assert cfg.rule_hparams == {"side": "input", "lam_unit": "per_dim", "edit_memory": 100.0, "memory_cap": 30.0}
    assert not hasattr(cfg, "edit_passes")
    assert set(presets()) == set(PRESETS) == {"mose", "mose-paper", "memit", "alphaedit", "rome", "rect", "prune"}


@pytest.mark.parametrize("model_type", [None, "llama", "gpt2", "gptj", "gpt_neox", "qwen2", "mistral"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_validates_and_makes_its_rule(name, model_type):
    cfg = MOSEConfig.preset(name, model_type)
    cfg.validate()
    assert cfg.preset_name == name and cfg.method == PRESETS[name].settings["method"]
    family = FAMILIES[model_type or "llama"]
    assert cfg.layers == ([family["layers"][-1]] if name == "rome" else family["layers"])
    for k, v in family["targets"].items():
        assert getattr(cfg, k) == v
    cfg.validate_for_model(max(cfg.layers) + 1)
    with pytest.raises(ValueError, match="out of range"):
        cfg.validate_for_model(max(cfg.layers))
    rule = make_rule(cfg)
    input_side = cfg.rule_hparams.get("side") == "input"
    assert type(rule) is (MOSEInputRule if input_side else RULES[cfg.method])
    for k, v in cfg.rule_hparams.items():            # the preset's values reach the rule
        if k == "side":
            continue
        actual = rule.hparams[k] if isinstance(rule, AdditiveRule) else getattr(rule, k)
        assert actual == v, (name, k)
    if cfg.method == "mose":
        assert rule.lam == cfg.lam and rule.polar_method == cfg.polar_method
        assert rule.solve_dtype == {"float64": torch.float64, "float32": torch.float32}[cfg.solve_dtype]


def test_mose_paper_is_the_output_side_rule_with_the_published_lambda():
    cfg = MOSEConfig.preset("mose-paper")
    rule = make_rule(cfg)
    assert type(rule) is MOSERule and rule.lam_unit == "per_dim" and cfg.land_retries == 0
    assert cfg.lam == PAPER_LAM_PER_DIM == 15000 / 4096


def test_from_dict_is_a_preset_plus_overrides():
    cfg = MOSEConfig.from_dict({"preset": "memit", "layers": [2, 3], "rule_hparams": {"mom2_update_weight": 7.0}})
    assert ((cfg.preset_name, cfg.method, cfg.layers, cfg.rule_hparams)
            == ("memit", "memit", [2, 3], {"mom2_update_weight": 7.0}))
    assert make_rule(cfg).lam == 7.0
    assert MOSEConfig.from_dict({}).to_dict() == MOSEConfig.preset("mose").to_dict()        # no preset: "mose"
    cfg = MOSEConfig.from_dict({"lam": 2.0, "context_template_prefixes": ["A", "B"]}, "gpt2")
    assert (cfg.preset_name, cfg.lam, cfg.layers) == ("mose", 2.0, FAMILIES["gpt2"]["layers"])
    assert cfg.context_template_prefixes == ("A", "B")
    # a round trip through to_dict gives the same configuration
    assert MOSEConfig.from_dict(cfg.to_dict(), "gpt2") == cfg


def test_from_json_reads_a_preset_plus_overrides_and_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "alphaedit", "rule_hparams": {"threshold": 0.05, "l2": 1.0}}))
    cfg = MOSEConfig.from_json(path)
    assert (cfg.method, cfg.rule_hparams) == ("alphaedit", {"threshold": 0.05, "l2": 1.0})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        MOSEConfig.from_json(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}.*not valid JSON"):
        MOSEConfig.from_json(path)
    path.write_text(json.dumps({"preset": "memit", "lam_typo": 1.0}))
    with pytest.raises(ValueError, match=f"{path}.*unknown field.*lam_typo"):
        MOSEConfig.from_json(path)
    path.write_text(json.dumps({"preset": "memit", "rule_hparams": {"bogus": 1}}))
    with pytest.raises(ValueError, match=f"{path}.*rule_hparams.*unknown option.*bogus"):
        MOSEConfig.from_json(path)


@pytest.mark.parametrize("overrides, field", [
    ({"layers": []}, "layers"),
    ({"layers": [5, 4]}, "layers"),
    ({"layers": [1, -1]}, "layers"),
    ({"lam": -1.0}, "lam"),
    ({"lam": float("inf")}, "lam"),
    ({"solve_dtype": "float16"}, "solve_dtype"),
    ({"polar_method": "qr"}, "polar_method"),
    ({"v_num_grad_steps": 0}, "v_num_grad_steps"),
    ({"stats_tokens": 1.5}, "stats_tokens"),
    ({"v_lr": 0.0}, "v_lr"),
    ({"kl_factor": -1.0}, "kl_factor"),
    ({"land_retries": -1}, "land_retries"),
    ({"land_boost": 1.0}, "land_boost"),
    ({"undo_history": -1}, "undo_history"),
    ({"stats_corpus": "/nonexistent/corpus.txt"}, "stats_corpus"),
    ({"rule_hparams": {"side": "input", "edit_memory": -1.0}}, "rule_hparams.edit_memory"),
    ({"rule_hparams": {"side": "input", "lam_unit": "per_token"}}, "rule_hparams.lam_unit"),
    ({"rule_hparams": {"side": "sideways"}}, "rule_hparams.side"),
    ({"method": "magic"}, "method 'magic' is not a rule"),
    ({"target_dtype": "float8"}, "target_dtype"),
    ({"v_stop_on": "kl"}, "v_stop_on"),
])
def test_validation_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MOSEConfig.preset("mose", where="my.json", **overrides)
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(MOSEConfig(), **overrides).validate()


def test_preset_rule_options_must_fit_the_method():
    with pytest.raises(ValueError, match="single layer"):
        MOSEConfig.preset("rome", layers=[3, 4])
    with pytest.raises(ValueError, match="land_retries.*MOSE rule"):
        MOSEConfig.preset("memit", land_retries=1)
    with pytest.raises(ValueError, match="unknown option.*side"):      # a MOSE option on an additive rule
        MOSEConfig.preset("memit", rule_hparams={"side": "input"})
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        MOSEConfig.preset("paper")
    with pytest.raises(ValueError, match="my.json.*unknown field"):
        MOSEConfig.from_dict({"edit_passes": 2}, where="my.json")        # a removed field


def _args(argv):
    parser = argparse.ArgumentParser()
    _add_model(parser)
    return parser.parse_args(argv)


def test_command_line_builds_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "memit", "layers": [1, 2], "rule_hparams": {"mom2_update_weight": 7.0}}))
    cfg = build_config(_args(["--config", str(path)]), "llama")
    assert (cfg.method, cfg.layers, cfg.rule_hparams) == ("memit", [1, 2], {"mom2_update_weight": 7.0})
    cfg = build_config(_args(["--config", str(path), "--layers", "3-5", "--seed", "4"]), "llama")
    assert (cfg.method, cfg.layers, cfg.seed) == ("memit", [3, 4, 5], 4)
    cfg = build_config(_args(["--preset", "rect", "--layers", "3"]), "gpt2")
    assert ((cfg.method, cfg.layers, cfg.clamp_norm_factor)
            == ("rect", [3], FAMILIES["gpt2"]["targets"]["clamp_norm_factor"]))
    assert build_config(_args([]), "llama").to_dict() == MOSEConfig.preset("mose", "llama").to_dict()
    path.write_text(json.dumps({"preset": "memit", "rule_hparams": {"bogus": 1}}))
    with pytest.raises(ValueError, match=f"{path}.*unknown option"):
        build_config(_args(["--config", str(path)]), "llama")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_config(_args(["--config", str(tmp_path / "nope.json")]), "llama")


def test_target_settings_of_earlier_runs_keep_their_identity():
    """A configuration with the target settings of runs made before they existed (float32 steps,
    stop on the loss) serialises without them, as those runs' run.json do; the presets' bf16 / NLL
    settings are written out, so a run folder of one is never resumed as the other."""
    old = MOSEConfig.preset("mose", target_dtype=None, v_stop_on="loss").to_dict()
    assert "target_dtype" not in old and "v_stop_on" not in old
    assert MOSEConfig.from_dict(old).target_dtype == "bfloat16"       # not from the dict: the default
    assert MOSEConfig.from_dict({**old, "target_dtype": None, "v_stop_on": "loss"}).to_dict() == old
    new = MOSEConfig.preset("mose").to_dict()
    assert (new["target_dtype"], new["v_stop_on"]) == ("bfloat16", "nll")
    assert {k: v for k, v in new.items() if k not in ("target_dtype", "v_stop_on")} == old

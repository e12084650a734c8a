"""Every shipped config file is a valid MOSEConfig whose rule can be built, and the command line
takes the method from the file unless --method is given."""
import argparse
import json
from pathlib import Path

import pytest

from mose_fast.cli import _config
from mose_fast.config import MOSEConfig
from mose_fast.rules import RULES, AdditiveRule, MOSEInputRule, make_rule

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    # the SmolLM2 settings of every rule in the side-by-side, and published settings of two families
    for rule in ("memit", "alphaedit", "rect", "prune", "rome", "mose-memory100"):
        assert f"smollm2-{rule}" in names
    assert {"gptj-6b-memit", "llama3-8b-alphaedit"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_rule(path):
    raw = json.loads(path.read_text())
    assert raw.get("method") in RULES, f"{path.name} must name its method"
    cfg = MOSEConfig.from_dict(raw)
    rule = make_rule(cfg)
    input_side = cfg.rule_hparams.get("side") == "input"
    assert type(rule) is (MOSEInputRule if input_side else RULES[cfg.method])
    for k, v in raw.get("rule_hparams", {}).items():    # the file's values reach the rule
        actual = rule.hparams[k] if isinstance(rule, AdditiveRule) else getattr(rule, k)
        assert actual == v, (path.name, k)
    assert cfg.layers == raw.get("layers", cfg.layers) and (cfg.method != "mose" or cfg.lam == raw.get("lam", 100.0))


def test_cli_method_comes_from_the_file_unless_given(tmp_path):
    class Model:  # _config reads only config.model_type
        class config:
            model_type = "llama"
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "memit", "rule_hparams": {"mom2_update_weight": 7.0}}))
    args = argparse.Namespace(config=str(path), layers=None, lam=None, stats_tokens=None, stats_corpus=None,
                              seed=None, polar_method=None, method=None)
    assert _config(args, Model).method == "memit"
    args.method = "rect"
    assert _config(args, Model).method == "rect"
    path.write_text(json.dumps({"method": "memit", "rule_hparams": {"bogus": 1}}))
    args.method = None
    with pytest.raises(ValueError, match="bad rule_hparams for memit"):
        make_rule(_config(args, Model))

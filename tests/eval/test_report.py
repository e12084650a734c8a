"""The before/after summary states the configuration as it was run."""
from mose_fast.eval.report import before_after_summary


def report(cfg):
    side = dict(efficacy=0.3, paraphrase=0.4, neighborhood=0.7, score=0.413, rewrite_nll_new=8.0)
    return dict(model="m", n_edits=20, config=cfg, commit="abc", date="d", machine="cpu", protocol="p",
                before=side, after=dict(side, efficacy=1.0), neighborhood_nll_true_change=-0.1,
                stability={"4": dict(fro_ratio=1.0, kappa_ratio=1.0, before=dict(kappa=22.0))},
                seconds_per_edit=dict(total=8.0), setup_seconds=4.0, wall_seconds=160.0, max_orth_error=1e-15)


def test_summary_names_the_preset_and_the_unit_of_lambda():
    text = before_after_summary(report(dict(preset="mose", layers=[4], lam=0.6510416666666666,
                                            rule_hparams=dict(lam_unit="per_dim"))))
    assert "preset `mose`" in text and "λ = 0.651 per dimension" in text
    text = before_after_summary(report(dict(preset=None, layers=[4], lam=100.0, rule_hparams={})))
    assert "preset `custom`" in text and "λ = 100," in text and "per dimension" not in text
    assert "| efficacy P(new) > P(true) | 0.300 | 1.000 |" in text

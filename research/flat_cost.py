"""Does an edit cost more after 10,000 edits than after none? (issue 35, item 2)

The same 100 requests (the first cases of ``counterfact-val.json``, never edited by the run) are edited
as one batch twice in one process: on the unedited model, and on the state a run folder saved after
its last edit (``state.safetensors``).  Reported for each: seconds by stage, solves, and the bytes of
every tensor the rules hold; and, from the run's journal, the seconds and state bytes of its first and
last edit calls as the run recorded them (with whatever else the machine was doing then).

    python research/flat_cost.py runs/smollm2-mose-cf-b100 --out research/results/flat_cost_mose.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.eval.store import RunFolder
from mose_fast.memit.stats import default_data_dir


def one_batch(editor: MOSEEditor, requests) -> dict:
    t = time.perf_counter()
    rec = editor.edit(requests)
    wall = time.perf_counter() - t
    out = {"wall_seconds": wall, "stages": rec.seconds, "solves": rec.attempts,
           "rule_state_bytes": editor.rule_state_bytes()}
    editor.undo()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", type=int, default=100)
    args = ap.parse_args()
    folder = RunFolder(args.run)
    identity = folder.read_identity()
    cfg = MOSEConfig.from_dict({**identity["config"], "undo_history": 1}, "llama")
    requests = load_requests(default_data_dir() / "counterfact" / "counterfact-val.json", limit=args.cases)
    journal = folder.journal(rewrite=False)
    result = {"run": args.run, "requests": f"the first {args.cases} cases of counterfact-val.json",
              "threads": torch.get_num_threads(),
              "journal_first": {"index": journal[0]["index"], "seconds": journal[0]["seconds"],
                                "attempts": journal[0]["attempts"],
                                "rule_state_bytes": journal[0].get("rule_state_bytes")},
              "journal_last": {"index": journal[-1]["index"], "seconds": journal[-1]["seconds"],
                               "attempts": journal[-1]["attempts"],
                               "rule_state_bytes": journal[-1].get("rule_state_bytes")}}
    model, tok = load_model()
    editor = MOSEEditor(model, tok, cfg, progress=False)
    editor.prepare()
    editor.edit(requests[:2])      # first-build checks of the target and key forwards, outside the timing
    editor.undo()
    result["unedited"] = {"rule_state_bytes_before": editor.rule_state_bytes(), **one_batch(editor, requests)}
    state, n_done = folder.load_state()
    editor.load_state_dict(state)
    result["after_run"] = {"n_edits": n_done, "rule_state_bytes_before": editor.rule_state_bytes(),
                           **one_batch(editor, requests)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

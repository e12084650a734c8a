"""Is the floor under old edits memory or drift?  Cases the run never edited (the first ``--cases`` of
``counterfact-val.json``), scored on the unedited model and on the state the run saved after its last edit:
where efficacy (P(new) > P(true)) rises on cases never edited, that much of an old edit's "efficacy" is a
drift of the model toward the kind of answers edits write, not the edit held.

    python research/unedited_cases.py runs/smollm2-mose-cf-b100 --out research/results/unedited_cases_mose.json
"""
import argparse
import json
from pathlib import Path

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.eval.metrics import score_cases, summarize
from mose_fast.eval.store import RunFolder
from mose_fast.memit.stats import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", type=int, default=500)
    args = ap.parse_args()
    folder = RunFolder(args.run)
    identity = folder.read_identity()
    requests = load_requests(default_data_dir() / "counterfact" / "counterfact-val.json", limit=args.cases)
    edited = set(identity["case_ids"])
    if any(r.case_id in edited for r in requests):
        raise SystemExit(f"{args.run} edited some of these cases")
    state, n_done = folder.load_state()
    model, tok = load_model(identity["model"])
    before = summarize(score_cases(model, tok, requests))
    editor = MOSEEditor(model, tok, MOSEConfig.from_dict({**identity["config"], "undo_history": 1},
                                                         model.config.model_type), progress=False)
    editor.load_weights(state)
    after = summarize(score_cases(model, tok, requests))
    result = {"run": args.run, "n_edits": n_done, "cases": f"the first {args.cases} of counterfact-val.json, never "
              "edited by the run", "unedited": before, "after_run": after}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k in ("efficacy", "paraphrase", "neighborhood", "score"):
        print(f"{k:>13}: unedited {before[k]:.3f}  after {n_done} edits {after[k]:.3f}")


if __name__ == "__main__":
    main()

"""How old edits fare after a long run: the run's evaluation sample scored on the state it saved after its
last edit (``state.safetensors``), split by when each case was edited (``eval.metrics.by_age``, ten equal
spans of the run, oldest first).  Where the run also evaluated at that edit, its totals are printed beside
(the same cases and weights give the same numbers: a check that the state is the one evaluated).

    python research/edit_age.py runs/smollm2-mose-cf-b100 --out research/results/edit_age_mose.json
"""
import argparse
import json
from pathlib import Path

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.eval.metrics import AGE_BINS, by_age, score_cases, summarize
from mose_fast.eval.runner import evaluation_sample
from mose_fast.eval.store import RunFolder
from mose_fast.memit.stats import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", default=str(default_data_dir() / "counterfact" / "counterfact-edit.json"),
                    help="the file the run edited (default: counterfact-edit.json of the data folder)")
    args = ap.parse_args()
    folder = RunFolder(args.run)
    identity = folder.read_identity()
    by_id = {r.case_id: r for r in load_requests(args.requests)}
    missing = [c for c in identity["case_ids"] if c not in by_id]
    if missing:
        raise SystemExit(f"{args.requests}: no cases {missing[:5]} of {args.run}/run.json (another requests file?)")
    requests = [by_id[c] for c in identity["case_ids"]]
    state, n_done = folder.load_state()
    if state is None:
        raise SystemExit(f"{args.run}: no state.safetensors (not in git: only the machine that ran it has it)")
    settings = identity["settings"]
    start = settings.get("background", 0)        # background edits are never scored (``runner.evaluate``)
    scored = requests[start:n_done]
    picked = evaluation_sample([r.case_id for r in scored], settings.get("sample"), settings.get("sample_seed", 0))
    model, tok = load_model(identity["model"])
    cfg = MOSEConfig.from_dict({**identity["config"], "undo_history": 1}, model.config.model_type)
    editor = MOSEEditor(model, tok, cfg, progress=False)
    editor.load_weights(state)                 # the edited weights; the rule's state is not needed to score
    scores = score_cases(model, tok, [scored[i] for i in picked])
    result = {"run": args.run, "n_edits": n_done, "background": start, "sample": len(picked),
              "sample_seed": settings.get("sample_seed", 0), "edit": summarize(scores),
              "edit_by_age": by_age(scores, picked, len(scored), min(AGE_BINS, len(scored)), offset=start)}
    logged = [e for e in folder.evals(rewrite=False) if e["n_edits"] == n_done]
    if logged:
        result["run_logged_edit"] = logged[-1]["edit"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.run}: {n_done} edits, {len(picked)} sampled cases; Score {result['edit']['score']:.3f}"
          + (f" (the run's own evaluation: {logged[-1]['edit']['score']:.3f})" if logged else ""))
    for b in result["edit_by_age"]:
        print(f"  edits {b['first']:>6}-{b['last']:<6} n {b['n']:>4}" + (
            f"  efficacy {b['efficacy']:.3f} paraphrase {b['paraphrase']:.3f} neighbourhood {b['neighborhood']:.3f}"
            if b["n"] else ""))


if __name__ == "__main__":
    main()

"""What moves an earlier edit away: later rotations of its layer, or keys gone stale? (issue 35 item 6)

Two states of one `mose` run on `counterfact-val.json` (an earlier and a later ``state.safetensors``,
e.g. after 1,000 and after 1,900 edits) and the unedited weights.  For the first N cases (edited
before the earlier state), at every edited layer l, with K the key (MEMIT's template mean) the model
of that state computes and W its matrix:

    change of the layer's output from the early to the late state   W2·K2 − W1·K1
      = (W2 − W1)·K1        rotation: later edits of layer l moved the old key's output
      + W2·(K2 − K1)        stale key: later edits of the layers below moved the key itself

each as a share of what the edits had written at that layer, ‖W1·K1 − W0·K0‖.  At the first edited
layer the key cannot move (nothing below it is edited), so its stale part is 0 exactly — a check.
Cases are split by their efficacy (P(new) > P(true) on the rewrite prompt) at the two states:
kept (1 → 1) and forgotten (1 → 0).

    python research/stale_keys.py runs/smollm2-mose-val1000-b100 runs/smollm2-mose-val1900-b100 \
        --n 1000 --out research/results/stale_keys.json
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from mose_fast import MOSEConfig, MOSEEditor, load_model
from mose_fast.eval.metrics import score_cases
from mose_fast.eval.store import RunFolder
from mose_fast.hf.hooks import capture_inputs, run_until
from mose_fast.hf.tokens import pad_batch
from mose_fast.memit.keys import _subject_batch, mean_key
from mose_fast.memit.stats import default_data_dir
from mose_fast.requests import load_benchmark


@torch.no_grad()
def all_keys(editor: MOSEEditor, requests, templates, chunk: int = 25) -> dict[int, torch.Tensor]:
    """{layer: n × d_in float64} keys of every request at every edited layer, one forward per chunk."""
    model, tok, arch, layers = editor.model, editor.tok, editor.arch, editor.cfg.layers
    flat = [t for g in templates for t in g]
    out = {l: [] for l in layers}
    for i in range(0, len(requests), chunk):
        part = requests[i:i + chunk]
        ids, positions = _subject_batch(tok, part, flat)
        with capture_inputs({l: arch.mlp_out_module(model, l) for l in layers}) as seen:
            run_until(model, arch.block(model, layers[-1]), **pad_batch(tok, ids, "cpu"))
        rows, cols = torch.arange(len(ids)), torch.tensor(positions)
        for l in layers:
            x = seen[l][0][rows, cols].view(len(part), len(flat), -1).double()
            out[l].append(mean_key(x, templates))
    return {l: torch.cat(v) for l, v in out.items()}


def snapshot(editor, requests, templates) -> dict:
    W = {l: editor.arch.weight_view(editor.model, l).double().clone() for l in editor.cfg.layers}
    return {"W": W, "K": all_keys(editor, requests, templates),
            "efficacy": [s.efficacy for s in score_cases(editor.model, editor.tok, requests)]}


def q(v: list[float]) -> dict:
    v = sorted(v)
    return {"median": statistics.median(v), "p10": v[len(v) // 10], "p90": v[9 * len(v) // 10], "n": len(v)} \
        if v else {"n": 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("early")
    ap.add_argument("late")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    early, late = RunFolder(args.early), RunFolder(args.late)
    identity = early.read_identity()
    cfg = MOSEConfig.from_dict({**identity["config"], "undo_history": 1}, "llama")
    model, tok = load_model()
    editor = MOSEEditor(model, tok, cfg, progress=False)
    templates = editor.context_templates()          # from the unedited model, as the run made them
    requests, _ = load_benchmark(default_data_dir() / "counterfact" / "counterfact-val.json", limit=args.n)
    states = {"unedited": snapshot(editor, requests, templates)}
    n_done = {}
    for name, folder in (("early", early), ("late", late)):
        state, n_done[name] = folder.load_state()
        if n_done[name] < args.n:
            raise SystemExit(f"{folder.path}: {n_done[name]} edits, fewer than the {args.n} cases compared")
        editor.load_weights(state)
        states[name] = snapshot(editor, requests, templates)
    s0, s1, s2 = states["unedited"], states["early"], states["late"]
    groups = {"all": list(range(len(requests))),
              "kept": [i for i in range(len(requests)) if s1["efficacy"][i] and s2["efficacy"][i]],
              "forgotten": [i for i in range(len(requests)) if s1["efficacy"][i] and not s2["efficacy"][i]]}
    report = {"early": str(early.path), "late": str(late.path), "n_done": n_done, "cases": len(requests),
              "efficacy": {k: statistics.mean(v["efficacy"]) for k, v in states.items()},
              "group_sizes": {g: len(ix) for g, ix in groups.items()}, "layers": {}}
    for l in cfg.layers:
        W0, W1, W2 = s0["W"][l], s1["W"][l], s2["W"][l]
        K0, K1, K2 = s0["K"][l], s1["K"][l], s2["K"][l]
        written = (K1 @ W1.T - K0 @ W0.T).norm(dim=1)
        total = (K2 @ W2.T - K1 @ W1.T).norm(dim=1) / written
        rotation = (K1 @ (W2 - W1).T).norm(dim=1) / written
        stale = ((K2 - K1) @ W2.T).norm(dim=1) / written
        drift = (K2 - K1).norm(dim=1) / K1.norm(dim=1)
        report["layers"][l] = {g: {"change": q(total[ix].tolist()), "rotation": q(rotation[ix].tolist()),
                                   "stale": q(stale[ix].tolist()), "key_drift": q(drift[ix].tolist())}
                               for g, ix in groups.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"efficacy: {report['efficacy']}, groups {report['group_sizes']}")
    print("| layer | group | change | rotation | stale key | key drift |")
    print("|---|---|---|---|---|---|")
    for l, by in report["layers"].items():
        for g, m in by.items():
            if m["change"]["n"]:
                print(f"| {l} | {g} ({m['change']['n']}) | " + " | ".join(
                    f"{m[k]['median']:.3f} [{m[k]['p10']:.3f}, {m[k]['p90']:.3f}]"
                    for k in ("change", "rotation", "stale", "key_drift")) + " |")


if __name__ == "__main__":
    main()

"""Do a run's edits fade, or do late edits stop landing?  Efficacy and paraphrase success of every
case edited so far, grouped by when it was edited, from run folders' saved states.

A run's evaluation gives one efficacy over all cases edited so far; this splits it by edit age
(cases 0-99, 100-199, ...).  Low in the old groups and high in the newest = old edits are undone
by later ones (more edit memory helps); low in the newest group too = new edits no longer land
(the retention terms outweigh the edit).

    python scripts/edit_age.py runs/smollm2-mose-memory100-cf-seq runs/smollm2-alphaedit-cf-seq

``--probe N`` then makes the run's next N edits from its saved state (in memory; the folder is not
written) and reports how many landed right after being made — what runs record since the journal
has a "landed" field, for runs made before it — in the run's batch size — and their efficacy and
paraphrase success once all N are made (do new edits generalise less on an edited model?).
``--memory-scale S`` multiplies MOSE's edit-memory weight μ by S for those N edits (the saved run
is untouched) and then re-scores the oldest group: does a lighter memory let new edits land, and
what does it cost the old ones?  ``--lam-scale S`` does the same for λ, ``--retain current`` makes
an input-side retain-original run's probe edits keep the current model, and ``--fresh`` makes the
probe edits on the unedited model instead (how the same cases generalise without earlier edits).
"""
import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from mose_fast.config import MOSEConfig
from mose_fast.editor import MOSEEditor
from mose_fast.eval.metrics import answer_nll, landed
from mose_fast.eval.runner import _restore_state
from mose_fast.models import load_model
from mose_fast.requests import load_requests
from mose_fast.rules import MOSEInputRule
from mose_fast.stats import default_data_dir


def success_by_age(model, tok, requests, group: int) -> list[dict]:
    """Per group of ``group`` consecutive cases: efficacy (P(new) > P(true) on the prompt) and
    paraphrase success (the same on each paraphrase)."""
    prompts, answers, index = [], [], []
    for i, r in enumerate(requests):
        for kind, ps in (("rw", [r.text]), ("pa", r.paraphrase_prompts)):
            for j, p in enumerate(ps):
                for which, a in (("new", r.target_new), ("true", r.target_true)):
                    prompts.append(p)
                    answers.append(a)
                    index.append((i, kind, j, which))
    nll = dict(zip(index, answer_nll(model, tok, prompts, answers)))
    rows = []
    for start in range(0, len(requests), group):
        ids = range(start, min(start + group, len(requests)))
        eff = [float(nll[(i, "rw", 0, "new")] < nll[(i, "rw", 0, "true")]) for i in ids]
        par = [float(nll[(i, "pa", j, "new")] < nll[(i, "pa", j, "true")])
               for i in ids for j in range(len(requests[i].paraphrase_prompts))]
        rows.append({"cases": f"{ids.start}-{ids.stop - 1}", "efficacy": statistics.mean(eff),
                     "paraphrase": statistics.mean(par) if par else float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--group", type=int, default=100)
    ap.add_argument("--probe", type=int, default=0, help="make the next N edits and report how many landed")
    ap.add_argument("--memory-scale", type=float, default=1.0,
                    help="with --probe: multiply the MOSE edit-memory weight μ by this for the probe edits")
    ap.add_argument("--lam-scale", type=float, default=1.0,
                    help="with --probe: multiply MOSE's corpus retention weight λ by this for the probe edits")
    ap.add_argument("--retain", choices=("current",),
                    help="with --probe: make a retain-original MOSE input-side run's probe edits retain the current model")
    ap.add_argument("--fresh", action="store_true",
                    help="with --probe: make the probe edits on the unedited model instead (the same cases, "
                         "to compare how they generalise with and without the earlier edits)")
    ap.add_argument("--oldest-only", action="store_true",
                    help="score only the oldest group (cases 0..group-1), not every age group")
    ap.add_argument("--data-dir", help="folder with counterfact/ (default: ../shared/data)")
    args = ap.parse_args()
    if (args.memory_scale != 1.0 or args.lam_scale != 1.0 or args.retain or args.fresh) and not args.probe:
        ap.error("--memory-scale, --lam-scale, --retain and --fresh only act on the --probe edits; give --probe N")
    if not (args.memory_scale >= 0.0 and args.lam_scale >= 0.0):
        ap.error(f"--memory-scale and --lam-scale must be ≥ 0; got {args.memory_scale}, {args.lam_scale}")
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    for folder in map(Path, args.folders):
        run = json.loads((folder / "run.json").read_text())
        model, tok = load_model(run["model"])      # fresh: the editor below starts from the unedited model
        # as the runner does: context templates from the unedited model, then the saved state
        editor = MOSEEditor(model, tok, MOSEConfig.from_dict(run["config"]), progress=False)
        editor._prepare()
        editor.context_templates()
        n_done = _restore_state(editor, folder / "state.safetensors")
        requests = load_requests(data / "counterfact" / "counterfact-edit.json", limit=n_done + args.probe)
        if [r.case_id for r in requests[:n_done]] != run["case_ids"][:n_done]:
            raise ValueError(f"{folder}: the run edited other cases than the first {n_done} of counterfact-edit.json")
        rows = success_by_age(model, tok, requests[:args.group if args.oldest_only else n_done], args.group)
        print(f"\n{folder.name} after {n_done} edits\n")
        print("| cases (edit order) | efficacy | paraphrase |\n|---|---|---|")
        for r in rows:
            print(f"| {r['cases']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} |")
        memory_weight(run["config"], load_file(str(folder / "state.safetensors")))
        if args.probe:
            if args.fresh:     # a second editor on a second, unedited copy of the model
                model, tok = load_model(run["model"])
                editor = MOSEEditor(model, tok, MOSEConfig.from_dict(run["config"]), progress=False)
                print("\nprobe edits on the unedited model")
            if args.memory_scale != 1.0:
                if not getattr(editor.rule, "edit_memory", 0.0):
                    raise ValueError(f"{folder}: --memory-scale needs a MOSE run with edit memory (μ > 0)")
                editor.rule.edit_memory *= args.memory_scale
                print(f"\nprobe with μ × {args.memory_scale:g} = {editor.rule.edit_memory:g}")
            if args.lam_scale != 1.0:
                if not hasattr(editor.rule, "lam"):
                    raise ValueError(f"{folder}: --lam-scale needs a MOSE run")
                editor.rule.lam *= args.lam_scale
                print(f"\nprobe with λ × {args.lam_scale:g} = {editor.rule.lam:g}")
            if args.retain:
                if not isinstance(editor.rule, MOSEInputRule):
                    raise ValueError(f"{folder}: --retain needs a MOSE input-side run (rule_hparams side 'input')")
                editor.rule.retain = args.retain
                print(f"\nprobe with retain = {args.retain!r}")
            hits, batch = [], run["settings"].get("batch_size", 1)   # in the run's batches
            for start in range(n_done, len(requests), batch):
                chunk = requests[start:start + batch]
                editor.edit(chunk)
                hits += landed(model, tok, chunk)
            probed = success_by_age(model, tok, requests[n_done:], args.probe)[0]
            print(f"\nnext {args.probe} edits (cases {n_done}-{n_done + args.probe - 1}, batch {batch}), landed right after "
                  f"being made: {sum(hits):.0f} of {len(hits)}; after all of them efficacy {probed['efficacy']:.2f}, "
                  f"paraphrase {probed['paraphrase']:.2f}")
            if args.fresh:
                continue
            oldest = success_by_age(model, tok, requests[:args.group], args.group)[0]
            print(f"after them, cases {oldest['cases']}: efficacy {oldest['efficacy']:.2f}, "
                  f"paraphrase {oldest['paraphrase']:.2f} (before: {rows[0]['efficacy']:.2f}, "
                  f"{rows[0]['paraphrase']:.2f})")


def memory_weight(config: dict, state: dict) -> None:
    """MOSE with edit memory: how the memory μ·E weighs against the corpus retention λ·G in the
    polar problem M = λ·G + μ·E + V·Aᵀ (a new edit's V·Aᵀ has weight 1), and how many directions
    of the rotated space the memory already holds (eigenvalues of E above 1 % of its largest)."""
    hp = config.get("rule_hparams") or {}
    mu, lam = float(hp.get("edit_memory", 0.0)), float(config.get("lam", 100.0))
    layers = sorted(int(k[2:]) for k in state if k.startswith("SE"))
    if not mu or not layers:
        return
    print(f"\nμ = {mu:g}, λ = {lam:g}\n\n| layer | μ·tr(E) / λ·tr(G) | directions held by E (of d) |\n|---|---|---|")
    for l in layers:
        E = state[f"SE{l}"].double()
        G = state[f"S{l}"] if f"S{l}" in state else state[f"SG{l}"]   # output side / input side
        ev = torch.linalg.eigvalsh(E)
        ratio = mu * float(torch.trace(E)) / (lam * float(torch.trace(G.double())))
        print(f"| {l} | {ratio:.0f} | {int((ev > 0.01 * ev.max()).sum())} of {E.shape[0]} |")


if __name__ == "__main__":
    main()

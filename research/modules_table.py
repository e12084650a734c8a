"""The `modules` comparison: run folders of the same cases and evaluation points, one per module
selection, side by side — the harness's scores, and the stability of *every* rotated matrix (the
run's own stability columns cover mlp.down; the other modules' spectra are in the journal at the
evaluation points, compared here with the unedited model's) — and the polynomial remainder of the
mlp.in edits by window of 100 edits.

    python research/modules_table.py runs/A runs/B ... [--labels a,b,...] [--model smollm2-135m] [--max-edits 300]
"""
import argparse
import json
import math
from pathlib import Path


def load_report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def journal(run: Path) -> list[dict]:
    from mose_fast.eval.store import read_lines
    return read_lines(run / "journal.jsonl", lambda e: True, rewrite=False)


def check_runs(runs: list[Path], labels: list[str]) -> None:
    """Before loading anything: every folder holds a finished run (report.json, journal.jsonl)."""
    if len(labels) != len(runs):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(runs)} run folders")
    for run in runs:
        for name in ("report.json", "journal.jsonl"):
            if not (run / name).is_file():
                raise SystemExit(f"{run / name}: not found (a finished run folder has it; "
                                 f"`mose-fast report --out {run}` writes report.json)")


def start_spectra(model_name: str, keys: set[str]) -> dict[str, dict]:
    """The unedited model's spectrum of every "module.layer.matrix" key."""
    from mose_fast.editor import spectrum
    from mose_fast.hf.arch import resolve_arch, unit_weights
    from mose_fast.hf.models import load_model
    model, _ = load_model(model_name)
    arch = resolve_arch(model)
    out = {}
    for key in keys:
        module, layer, name = key.rsplit(".", 2)
        out[key] = spectrum(unit_weights(model, arch, int(layer), module).matrices()[name])
    return out


def worst(changes: list[float]) -> str:
    return f"{max(changes, key=abs):+.1e}" if changes else "–"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--labels")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-edits", type=int, help="evaluation points up to this many edits")
    a = ap.parse_args()
    runs = [Path(r) for r in a.runs]
    labels = a.labels.split(",") if a.labels else [r.name for r in runs]
    check_runs(runs, labels)
    journals = {r: journal(r) for r in runs}
    keys = {k for j in journals.values() for e in j for k in e.get("unit_spectra", {})}
    start = start_spectra(a.model, keys) if keys else {}

    print("| modules | edits | Score | efficacy | paraphrase | neighb. | rewrite acc | rephrase acc | "
          "locality | SST-2 ret. | ppl ratio | ‖W‖_F change (all rotated) | κ₂ change (all rotated) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run, label in zip(runs, labels):
        rep = load_report(run)
        spectra_at = {}
        for e in journals[run]:
            if "unit_spectra" in e:
                spectra_at[e["index"] + len(e["case_ids"])] = e["unit_spectra"]
        for ev in rep["evaluations"]:
            n = ev["n_edits"]
            if n == 0 or (a.max_edits and n > a.max_edits):
                continue
            ed, tk, ret = ev["edit"], ev["edit_token"], ev.get("retention", {})
            fro = [v["fro"] - 1 for v in ev.get("stability_ratio", {}).values()]
            kap = [v["kappa"] - 1 for v in ev.get("stability_ratio", {}).values()]
            for k, s in spectra_at.get(n, {}).items():
                fro.append(s["fro"] / start[k]["fro"] - 1)
                kap.append(s["kappa"] / start[k]["kappa"] - 1)
            print(f"| {label} | {n} | {ed['score']:.3f} | {ed['efficacy']:.3f} | {ed['paraphrase']:.3f} | "
                  f"{ed['neighborhood']:.3f} | {tk['rewrite_acc']:.3f} | {tk['rephrase_acc']:.3f} | "
                  f"{tk['locality']:.3f} | {ret.get('sst2', math.nan):.3f} | "
                  f"{ret.get('perplexity', math.nan):.3f} | {worst(fro)} | {worst(kap)} |")

    for run, label in zip(runs, labels):
        rem = [(e["index"], l["poly_remainder"]) for e in journals[run] for l in e.get("layers", [])
               if l.get("module") == "mlp.in" and l.get("poly_remainder") is not None]
        if not rem:
            continue
        print(f"\npolynomial remainder ‖ΔMLP_true − ΔMLP_poly‖ / ‖resid‖ per mlp.in solve, {label}:\n")
        print("| edits | solves | mean | median | max |\n|---|---|---|---|---|")
        for w in range(0, max(i for i, _ in rem) + 1, 100):
            xs = sorted(r for i, r in rem if w <= i < w + 100 and math.isfinite(r))
            if xs:
                print(f"| {w + 1}–{w + 100} | {len(xs)} | {sum(xs) / len(xs):.3f} | "
                      f"{xs[len(xs) // 2]:.3f} | {xs[-1]:.3f} |")


if __name__ == "__main__":
    main()

"""Rows of docs/results.md's tables from a run folder's report.json (so the tables are generated, not
retyped).

    python research/results_rows.py runs/NAME [--label mose-paper] [--per-run]

Prints the summary row of the run's last evaluation (``| label | run folder | edits | Score | … |``) and,
with ``--per-run``, the per-run table (one row per evaluation)."""
import argparse
import json
from pathlib import Path


def change(x: float, rotation: bool) -> str:
    """Signed relative change: scientific for rounding-level changes, per cent otherwise."""
    return f"{x:+.1e}" if rotation or abs(x) < 1e-4 else f"{100 * x:+.1f} %"


def largest(ev: dict, key: str) -> float:
    """The edited layer's ratio − 1 furthest from 0 (signed)."""
    ratios = [v[key] - 1 for v in ev.get("stability_ratio", {}).values()]
    return max(ratios, key=abs) if ratios else 0.0


def cells(ev: dict, rotation: bool) -> list[str]:
    e, t, ret = ev["edit"], ev["edit_token"], ev.get("retention", {"sst2": 1.0, "perplexity": 1.0})
    ppl = ret["perplexity"]
    return [f"{e['score']:.3f}", f"{e['efficacy']:.3f}", f"{e['paraphrase']:.3f}", f"{e['neighborhood']:.3f}",
            f"{t['rewrite_acc']:.3f}", f"{ret['sst2']:.3f}", f"{ppl:.3f}" if ppl < 100 else f"{ppl:.3g}",
            change(largest(ev, "fro"), rotation), change(largest(ev, "kappa"), rotation)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--label")
    ap.add_argument("--per-run", action="store_true")
    a = ap.parse_args()
    run = Path(a.run)
    rep = json.loads((run / "report.json").read_text())
    rotation = rep.get("method") == "mose" or str(rep.get("config", {}).get("method", "")).startswith("mose")
    last = rep["evaluations"][-1]
    link = f"[`{run.name}`](../runs/{run.name}/summary.md)"
    print("| " + " | ".join([a.label or rep["config"].get("preset") or rep["method"], link, str(last["n_edits"])]
                            + cells(last, rotation)) + " |")
    if a.per_run:
        print("\n| edits | Score | efficacy | paraphrase | neighb. | rewrite acc | SST-2 ret. | ppl ratio "
              "| ‖W‖_F change | κ₂ change | landed |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for ev in rep["evaluations"]:
            landed = ev.get("landed")
            landed = "–" if landed is None or landed != landed else f"{landed:.2f}"
            print("| " + " | ".join([str(ev["n_edits"])] + cells(ev, rotation) + [landed]) + " |")


if __name__ == "__main__":
    main()

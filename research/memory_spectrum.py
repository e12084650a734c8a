"""How many directions the edit keys fill: the spectrum of the edit memory E = F·Fᵀ that a `mose` run's state
holds per layer (issue 35 item 6, key-space capacity).

Per edited layer: the participation ratio (Σλ)²/Σλ² of E's eigenvalues — the number of equally strong
directions that would hold the same energy — and the share of tr(E) in its top 10 / 50 / 100 / 300 directions.

    python research/memory_spectrum.py runs/smollm2-mose-val1000-b100 runs/smollm2-mose-cf-b100
"""
import argparse

import torch
from safetensors.torch import load_file


def spectrum_summary(F: torch.Tensor, tops=(10, 50, 100, 300)) -> dict:
    ev = torch.linalg.svdvals(F.double()).pow(2)           # E's eigenvalues, largest first, without forming E
    total = ev.sum()
    share = ev.cumsum(0) / total
    return {"participation_ratio": float(total ** 2 / ev.pow(2).sum()),
            "top_share": {k: float(share[min(k, len(ev)) - 1]) for k in tops}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    print("| run | edit calls | layer | participation ratio | share of tr(E) in top 10 / 50 / 100 / 300 |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        state = load_file(f"{run}/state.safetensors")
        keys = sorted(k for k in state if k.startswith("rule.K."))
        if not keys:
            raise SystemExit(f"{run}/state.safetensors: no edit memory (rule.K.*): not a `mose` input-side run")
        for key in keys:
            s = spectrum_summary(state[key])
            print(f"| {run} | {int(state['n_edits'])} | {key.split('.')[-1]} | {s['participation_ratio']:.1f} | "
                  + " / ".join(f"{v:.3f}" for v in s["top_share"].values()) + " |")


if __name__ == "__main__":
    main()

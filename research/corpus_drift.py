"""How far each edited layer's outputs on the corpus keys have moved, from run folders' saved states:

    drift_l = tr((W_l − W0_l)·C0_l·(W_l − W0_l)ᵀ) / tr(W0_l·C0_l·W0_lᵀ) = E‖(W−W0)k‖² / E‖W0·k‖²

the quantity MOSE's retention term (retain="original") and AlphaEdit's projector hold down.
Reads state.safetensors (the run's latest state) and w0.safetensors; C0 comes from the cache
(``mose-fast stats``), so the model is loaded only to fingerprint it.

    python scripts/corpus_drift.py runs/smollm2-*-cf-seq runs/smollm2-mose-cf1000
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mose_fast.config import MOSEConfig
from mose_fast.hf.arch import resolve_arch
from mose_fast.hf.models import load_model
from mose_fast.memit.stats import default_data_dir, key_second_moments


def drift(W: torch.Tensor, W0: torch.Tensor, C0: torch.Tensor) -> float:
    W, W0, C0 = W.double(), W0.double(), C0.double()
    D = W - W0
    return float(torch.trace(D @ C0 @ D.T) / torch.trace(W0 @ C0 @ W0.T))


def main(folders: list[str]) -> None:
    runs = [(f, json.loads((Path(f) / "run.json").read_text())) for f in folders]
    layers = sorted({l for _, r in runs for l in r["config"]["layers"]})
    model, tok = load_model(runs[0][1]["model"])
    cfg = MOSEConfig()
    C0 = key_second_moments(model, tok, resolve_arch(model), layers,
                            str(default_data_dir() / "wikitext-2" / "valid.txt"),
                            cfg.stats_tokens, cfg.stats_seq_len, cfg.stats_batch_size, progress=False)
    print("| run | edits | " + " | ".join(f"layer {l}" for l in layers) + " |")
    print("|---" * (2 + len(layers)) + "|")
    for f, r in runs:
        with safe_open(str(Path(f) / "state.safetensors"), "pt") as h:
            n = h.metadata()["n_done"]
        state, w0 = load_file(str(Path(f) / "state.safetensors")), load_file(str(Path(f) / "w0.safetensors"))
        cells = [f"{drift(state[f'W{l}'], w0[f'W{l}'], C0[l]):.2e}" if f"W{l}" in state else "" for l in layers]
        print(f"| {Path(f).name} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

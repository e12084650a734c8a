"""How large an edit key is against the corpus keys the retention term holds: the assumption behind
carrying λ across model widths per dimension (docs/research.md, "λ across model widths").

For the first N CounterFact requests on SmolLM2, at each edited layer: ‖W·k_E‖² / tr(W·C0·Wᵀ) (the
output side's edit term against its retention Gram's trace) and ‖k_E‖² / tr(C0) (the input side's).
Both are 1 for a key drawn like the corpus keys.

    python research/edit_key_norms.py [--n 100]
"""
import argparse
import statistics

import torch

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.memit.keys import compute_keys
from mose_fast.memit.stats import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    model, tok = load_model()
    cfg = MOSEConfig.preset("mose", "llama")
    editor = MOSEEditor(model, tok, cfg, progress=False)
    C0 = editor.second_moments()
    templates = editor.context_templates()
    reqs = load_requests(default_data_dir() / "counterfact" / "counterfact-edit.json", limit=args.n)
    print("| layer | ‖W·k_E‖² / tr(W·C0·Wᵀ): median [10 %, 90 %] | ‖k_E‖² / tr(C0): median [10 %, 90 %] |")
    print("|---|---|---|")
    for l in cfg.layers:
        W = editor.arch.weight_view(model, l).double()
        K = compute_keys(model, tok, editor.arch, l, reqs, templates).double()      # n × d_in
        c = C0[l].double()
        out = ((K @ W.T).pow(2).sum(1) / torch.trace(W @ c @ W.T)).tolist()
        inp = (K.pow(2).sum(1) / torch.trace(c)).tolist()

        def q(v):
            v = sorted(v)
            return f"{statistics.median(v):.2f} [{v[len(v) // 10]:.2f}, {v[9 * len(v) // 10]:.2f}]"
        print(f"| {l} | {q(out)} | {q(inp)} |")


if __name__ == "__main__":
    main()

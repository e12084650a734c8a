"""How well a low-order polynomial stands in for SmolLM2's activation on its own pre-activations —
the approximation the FFN-input rule (``mose_fast/rules/mose_ffn_in.py``, module "mlp.in") rests on.

Collects the gate pre-activations W_gate·x of layers 4–8 over ~20k tokens of WikiText-2's
validation text (``../shared/data/wikitext-2/valid.txt`` beside the checkout; text the model writes
itself when that is absent) into a histogram per layer (the same statistics pass the editor runs),
fits the activation by weighted least squares for degrees 1–7 and prints the relative error
RMS(act − p) / RMS(act) over each layer's pre-activation distribution, as a Markdown table.

    python research/poly_fit.py [--tokens 20000] [--layers 4 5 6 7 8] [--degrees 7]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mose_fast import load_model
from mose_fast.hf.arch import resolve_arch, unit_weights
from mose_fast.memit.stats import compute_unit_statistics, generated_corpus, read_corpus
from mose_fast.rules.mose_ffn_in import fit_polynomial

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    ap.add_argument("--degrees", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tok = load_model()
    arch = resolve_arch(model)
    if CORPUS.is_file():
        texts, source = read_corpus(CORPUS), str(CORPUS)
    else:
        texts, source = generated_corpus(model, tok, args.tokens), "text the model generates"
    stats, count = compute_unit_statistics(model, tok, arch, {"mlp.in": args.layers}, texts, args.tokens,
                                           seq_len=256, batch_size=8, progress=True)
    act = unit_weights(model, arch, args.layers[0], "mlp.in").act
    print(f"\n{count} tokens of {source}; activation {type(act).__name__}; "
          "relative error RMS(act − p)/RMS(act) over each layer's pre-activations\n")
    print("| layer | pre-activation mean ± std | range | "
          + " | ".join(f"degree {d}" for d in range(1, args.degrees + 1)) + " |")
    print("|---" * (3 + args.degrees) + "|")
    for l in args.layers:
        st = stats["mlp.in"][l]
        x, w = st["hist_means"], st["hist_counts"]
        mean = float((w * x).sum() / w.sum())
        std = float(((w * (x - mean) ** 2).sum() / w.sum()).sqrt())
        act = unit_weights(model, arch, l, "mlp.in").act
        errs = [fit_polynomial(x, w, act, d)[1] for d in range(1, args.degrees + 1)]
        print(f"| {l} | {mean:.2f} ± {std:.2f} | [{float(x.min()):.1f}, {float(x.max()):.1f}] | "
              + " | ".join(f"{e:.3g}" for e in errs) + " |")


if __name__ == "__main__":
    main()

"""Accuracy of every polar-factor method against float64 SVD on the same real M.

M = λ·P + V_E·A_Eᵀ for SmolLM2-135M layer 8 (P from the cached WikiText-2 statistics, A_E and
V_E from a real CounterFact edit).  Prints a Markdown table: ‖RᵀR − I‖_F, ‖R − R_exact‖_F,
relative objective gap, and time on this machine.

    python benchmarks/polar_accuracy.py [--lam 100] [--layer 8]
"""
import argparse
import time

import torch

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.memit.keys import block_outputs_at_subject, compute_keys
from mose_fast.memit.stats import default_data_dir
from mose_fast.memit.targets import compute_targets
from mose_fast.solve.polar import POLAR_METHODS, newton_schulz_step
from mose_fast.solve.procrustes import SUBSPACE_METHODS, objective, orthogonality_error, solve_subspace


def real_problem(lam: float, layer: int):
    model, tok = load_model()
    cfg = MOSEConfig(layers=[4, 5, 6, 7, layer], lam=lam)
    editor = MOSEEditor(model, tok, cfg, progress=False)
    editor._prepare()
    req = load_requests(default_data_dir() / "counterfact" / "counterfact-val.json", limit=1)
    tpl = editor.context_templates()
    z = compute_targets(model, tok, editor.arch, layer, req, tpl, cfg)[0].z.double()
    K = compute_keys(model, tok, editor.arch, layer, req, tpl).double()
    cur = block_outputs_at_subject(model, tok, editor.arch, layer, req).double()
    W = editor.arch.weight_view(model, layer).double()
    A = W @ K.T
    V = A + (z - cur).T            # the last edited layer takes the whole residual
    return editor.rule.gram[layer], A, V


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lam", type=float, default=100.0)
    ap.add_argument("--layer", type=int, default=8)
    args = ap.parse_args()
    P, A, V = real_problem(args.lam, args.layer)
    M = args.lam * P + V @ A.T
    R_ref = POLAR_METHODS["svd"](M)
    f_ref = objective(R_ref, P, A, V, args.lam)
    f_id = objective(torch.eye(M.shape[0], dtype=M.dtype), P, A, V, args.lam)
    s = torch.linalg.svdvals(M)
    print(f"M: {tuple(M.shape)}, κ(M) = {float(s[0] / s[-1]):.3e}, objective at I = {f_id:.6e}, "
          f"at the exact R = {f_ref:.6e}\n")
    print("| method | ‖RᵀR − I‖_F | ‖R − R_exact‖_F | (f − f_exact)/(f_I − f_exact) | seconds |")
    print("|---|---|---|---|---|")

    def row(name, R, dt):
        f = objective(R, P, A, V, args.lam)
        print(f"| {name} | {orthogonality_error(R):.2e} | {float(torch.linalg.matrix_norm(R - R_ref)):.2e} | "
              f"{(f - f_ref) / (f_id - f_ref):.2e} | {dt:.3f} |")
    for name in ["svd", "eigh", "newton_schulz", "newton_schulz_fp32", "polar_express", "polar_express_fp32",
                 *SUBSPACE_METHODS]:
        t = time.perf_counter()
        if name in SUBSPACE_METHODS:
            R = solve_subspace(P, A, V, args.lam, **SUBSPACE_METHODS[name]).full()
        else:
            R = newton_schulz_step(POLAR_METHODS[name](M))    # as solve_rotation finishes every method
        dt = time.perf_counter() - t
        row(name, R, dt)
    # how the subspace optimum approaches the exact one as the subspace grows
    print("\n| Krylov depth q | random rank r | k = dim S | (f − f_exact)/(f_I − f_exact) | seconds |")
    print("|---|---|---|---|---|")
    for q, r in [(0, 0), (1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (32, 0), (64, 0), (0, 128), (2, 128), (8, 128),
                 (16, 128)]:
        t = time.perf_counter()
        sub = solve_subspace(P, A, V, args.lam, krylov_depth=q, random_rank=r)
        dt = time.perf_counter() - t
        print(f"| {q} | {r} | {sub.Q.shape[1]} | {(sub.objective - f_ref) / (f_id - f_ref):.2e} | {dt:.3f} |")

if __name__ == "__main__":
    main()

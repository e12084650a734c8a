"""Sequential-editing run: scores before, N sequential edits, scores after, stability, timing.

Writes ``report.json`` and ``summary.md`` into the output folder.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import MOSEConfig
from ..editor import MOSEEditor
from ..requests import EditRequest
from .metrics import score_cases, summarize


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def run_sequential(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path | None = None,
                   model_name: str = "", progress: bool = True) -> dict:
    editor = MOSEEditor(model, tok, cfg, progress=progress)
    before = score_cases(model, tok, requests)
    spectra_before = {l: editor.spectrum(l) for l in cfg.layers}
    t0 = time.perf_counter()
    records = editor.edit_sequential(requests)
    wall = time.perf_counter() - t0
    after = score_cases(model, tok, requests)
    spectra_after = {l: editor.spectrum(l) for l in cfg.layers}

    nb_delta = [statistics.mean(a.neighborhood_nll_true) - statistics.mean(b.neighborhood_nll_true)
                for a, b in zip(after, before) if a.neighborhood_nll_true]
    stages = ("targets", "keys", "solve", "apply", "total")
    report = {
        "model": model_name, "n_edits": len(requests), "batch_size": 1, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} CPU, "
        f"{torch.get_num_threads()} torch threads", "config": cfg.to_dict(),
        "protocol": "probability comparison (MEMIT eval_utils_counterfact): mean-token NLL of ' '+answer",
        "before": summarize(before), "after": summarize(after),
        "neighborhood_nll_true_change": statistics.mean(nb_delta) if nb_delta else float("nan"),
        "stability": {str(l): {"fro_ratio": spectra_after[l]["fro"] / spectra_before[l]["fro"],
                               "kappa_ratio": spectra_after[l]["kappa"] / spectra_before[l]["kappa"],
                               "before": spectra_before[l], "after": spectra_after[l]} for l in cfg.layers},
        "seconds_per_edit": {s: statistics.mean(r.seconds[s] for r in records) for s in stages},
        "wall_seconds": wall, "setup_seconds": sum(r.seconds_setup for r in records),
        "max_orth_error": max(l.orth_error for r in records for l in r.layers),
        "cases": [{"case_id": b.case_id, "efficacy_before": b.efficacy, "efficacy_after": a.efficacy,
                   "paraphrase_after": a.paraphrase, "neighborhood_after": a.neighborhood,
                   "rewrite_nll_new": [b.rewrite_nll_new, a.rewrite_nll_new],
                   "rewrite_nll_true": [b.rewrite_nll_true, a.rewrite_nll_true]} for b, a in zip(before, after)],
        "records": [r.to_dict() for r in records],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "summary.md").write_text(markdown_summary(report))
    return report


def markdown_summary(rep: dict) -> str:
    b, a = rep["before"], rep["after"]
    cfg = rep["config"]
    lines = [
        f"# MOSE sequential editing: {rep['model']}",
        "",
        f"{rep['n_edits']} sequential edits (batch 1), layers {cfg['layers']}, λ = {cfg['lam']}, "
        f"commit {rep['commit']}, {rep['date']}, {rep['machine']}.",
        f"Protocol: {rep['protocol']}.",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| efficacy P(new) > P(true) | {b['efficacy']:.3f} | {a['efficacy']:.3f} |",
        f"| paraphrase success | {b['paraphrase']:.3f} | {a['paraphrase']:.3f} |",
        f"| neighbourhood success P(true) > P(new) | {b['neighborhood']:.3f} | {a['neighborhood']:.3f} |",
        f"| Score (harmonic mean) | {b['score']:.3f} | {a['score']:.3f} |",
        f"| mean NLL of target_new on rewrite prompt | {b['rewrite_nll_new']:.3f} | {a['rewrite_nll_new']:.3f} |",
        "",
        f"Mean change of the neighbourhood prompts' NLL of their true answer: "
        f"{rep['neighborhood_nll_true_change']:+.4f} nats.",
        "",
        "| layer | ‖W‖_F after/before | κ₂ after/before | κ₂ before |",
        "|---|---|---|---|",
    ]
    for l, s in rep["stability"].items():
        lines.append(f"| {l} | {s['fro_ratio']:.12f} | {s['kappa_ratio']:.12f} | {s['before']['kappa']:.2f} |")
    sp = rep["seconds_per_edit"]
    lines += ["", "Seconds per edit: " + ", ".join(f"{k} {v:.2f}" for k, v in sp.items()) +
              f"; one-time setup (C0, templates) {rep['setup_seconds']:.0f} s; wall {rep['wall_seconds']:.0f} s; max ‖RᵀR − I‖_F = {rep['max_orth_error']:.2e}.", ""]
    return "\n".join(lines)

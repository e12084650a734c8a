"""Reports of a run folder: the report dict, ``summary.md`` and ``plots.png``; and the summary of a
short before/after run."""
from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({platform.machine()} host, {os.cpu_count()} cores)"
    return f"{platform.machine()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def build_report(identity: dict, journal: list[dict], evals: list[dict], wall: float,
                 provenance: dict | None = None) -> dict:
    base = evals[0]
    stages = ("targets", "keys", "solve", "apply", "total")
    prev = 0
    for e in evals:
        e["retention"] = {k: e["general"][k] / base["general"][k] for k in e["general"]}
        # share of the edits since the previous evaluation that succeeded right after being made
        # (journals written before this was recorded have no "landed": nan)
        entries = [j for j in journal if prev <= j["index"] < e["n_edits"]]
        window = [x for j in entries for x in (j.get("landed") or [])]
        e["landed"] = statistics.mean(window) if window else float("nan")
        # seconds per edit call (batch) in the window, and the rules' state after its last edit
        e["seconds_per_batch"] = statistics.mean(j["seconds"]["total"] for j in entries) if entries else float("nan")
        e["rule_state_bytes"] = entries[-1].get("rule_state_bytes") if entries else None
        prev = e["n_edits"]
        e["stability_ratio"] = {l: {"fro": s["fro"] / base["stability"][l]["fro"],
                                    "kappa": s["kappa"] / base["stability"][l]["kappa"]}
                                for l, s in e["stability"].items()}
    return {
        **identity, "commit": git_commit(), "date": time.strftime("%F %T"), "machine": machine(),
        **(provenance or {}),
        "protocol": "probability comparison (MEMIT eval_utils_counterfact): mean-token NLL of ' '+answer; "
                    "general: zero-shot label likelihood; perplexity on WikiText-2 test",
        "n_edits": sum(len(j["case_ids"]) for j in journal),
        "seconds_per_edit": {s: statistics.mean(j["seconds"][s] for j in journal) for s in stages} if journal else {},
        "seconds_per_edit_median": {s: statistics.median(j["seconds"][s] for j in journal) for s in stages}
        if journal else {},
        "max_orth_error": max((l["orth_error"] for j in journal for l in j["layers"]), default=float("nan")),
        "wall_seconds_this_session": wall,
        "evaluations": evals,
    }


def _code_line(rep: dict) -> str:
    """Which commit ran which edits (run.json records the start and every resume)."""
    if not rep.get("started_commit"):
        return ""
    parts = [f"Edits run by commit {rep['started_commit']} (started {rep.get('started')})"]
    parts += [f"from edit {r['n_done']} by commit {r['commit']} (resumed {r['at']})" for r in rep.get("resumes", [])]
    line = "; ".join(parts) + "."
    for x in rep.get("extended", []):
        line += f" Extended from {x['from']} to {x['to']} planned edits at commit {x['commit']} ({x['at']})."
    if rep.get("initial_eval_from"):
        src = rep["initial_eval_from"]
        line += (f" Row 0 (the unedited model, same cases and settings) is taken from {src['folder']} "
                 f"(commit {src['commit']}).")
    return line


def markdown_summary(rep: dict) -> str:
    cfg, st = rep["config"], rep["settings"]
    ev = rep["evaluations"]
    planned = len(rep["case_ids"])
    status = "" if rep["n_edits"] >= planned else f" — **partial: {rep['n_edits']} of {planned} planned edits**"
    name = cfg.get("preset") or rep["method"]
    lines = [f"# {name} sequential editing: {rep['model']}{status}", "",
             f"{rep['n_edits']} sequential edits (batch {st['batch_size']}), preset {name!r}, layers {cfg['layers']}; "
             f"report written at commit {rep['commit']}, {rep['date']}, {rep['machine']}.",
             _code_line(rep),
             *([f"Key statistics C0: {rep['statistics_corpus']}."] if rep.get("statistics_corpus") else []),
             f"Protocol: {rep['protocol']}.", "",
             "| edits | efficacy | paraphrase | neighbourhood | Score | rewrite acc | rephrase acc | locality | " +
             " | ".join(f"{k} (ret.)" for k in ev[0]["general"]) + " | max ‖W‖_F ratio−1 | max κ₂ ratio | landed | "
             "s/batch | state MiB |",
             "|---" * (12 + len(ev[0]["general"]) + 1) + "|"]
    for e in ev:
        m = e["edit"]
        gen = " | ".join(f"{e['general'][k]:.3f} ({e['retention'][k]:.3f})" for k in e["general"])
        fro = max(abs(r["fro"] - 1) for r in e["stability_ratio"].values())
        kap = max(r["kappa"] for r in e["stability_ratio"].values())
        t = e.get("edit_token", {})
        tok_cols = " | ".join(f"{t.get(k, float('nan')):.3f}" for k in ("rewrite_acc", "rephrase_acc", "locality"))
        state = e.get("rule_state_bytes")
        lines.append(f"| {e['n_edits']} | {m['efficacy']:.3f} | {m['paraphrase']:.3f} | {m['neighborhood']:.3f} | "
                     f"{m['score']:.3f} | {tok_cols} | {gen} | {fro:.1e} | {kap:.6f} | "
                     f"{e.get('landed', float('nan')):.2f} | "
                     f"{e.get('seconds_per_batch', float('nan')):.1f} | "
                     f"{'–' if state is None else f'{state / 2 ** 20:.1f}'} |")
    sp, med = rep["seconds_per_edit"], rep.get("seconds_per_edit_median", {})
    if sp:
        per = "edit" if st["batch_size"] == 1 else f"edit call (a batch of {st['batch_size']})"
        lines += ["", f"Seconds per {per}, median (mean): " +
                  ", ".join(f"{k} {med.get(k, float('nan')):.2f} ({v:.2f})" for k, v in sp.items()) +
                  f"; max ‖RᵀR − I‖_F = {rep['max_orth_error']:.1e}."]
    sample = st.get("sample")
    scope = ("row k the k cases edited so far, after k edits" if sample is None else
             f"row k a uniform sample of {sample} of the k cases edited so far (seed {st.get('sample_seed', 0)}; "
             "`evaluation_sample`), after k edits; the last batch's scores on their own are in report.json "
             "(`edit_last_batch`)")
    general_n = ev[0].get("general_n")
    items = "" if not general_n else " General tasks on all their items (" + ", ".join(
        f"{k} {v}" for k, v in general_n.items()) + ")."
    n0 = ev[0]['edit'].get('n', '')
    row0 = (f"the run's first {n0} cases" if sample is None else
            f"a uniform sample of {n0} of all the run's cases (the same seed)")
    lines += ["", f"Row 0 scores {row0} before any edit; "
              f"{scope}. Columns 2-5: probability-comparison protocol; 6-8: token-accuracy protocol "
              "(teacher-forced target-token accuracy; locality = agreement with the pre-edit argmax tokens). "
              "Landed: share of the edits since the previous row that succeeded (efficacy) right after being made. "
              "Retention = value / value before editing (perplexity: ratio, lower is better). "
              "s/batch: seconds per edit call since the previous row; state MiB: every tensor the rules hold "
              f"after the row's last edit.{items}"]
    lines += _control_table(ev, st)
    lines += _age_table(ev)
    return "\n".join(lines) + "\n"


def _control_table(ev: list[dict], st: dict) -> list[str]:
    """The never-edited control cases at every evaluation (``EvalSettings.control``)."""
    rows = [e for e in ev if e.get("control")]
    if not rows:
        return []
    lines = ["", f"Cases the run never edits ({st.get('control_n')} of {st.get('control')}), at each evaluation: "
             "the drift on facts nobody edited, to read the edited cases' scores against:", "",
             "| edits | efficacy | paraphrase | neighbourhood | Score |", "|---|---|---|---|---|"]
    for e in rows:
        c = e["control"]
        lines.append(f"| {e['n_edits']} | {c['efficacy']:.3f} | {c['paraphrase']:.3f} | {c['neighborhood']:.3f} | "
                     f"{c['score']:.3f} |")
    return lines


def _age_table(ev: list[dict]) -> list[str]:
    """The last evaluation's edited cases split by when they were edited (``metrics.by_age``)."""
    aged = [e for e in ev if e.get("edit_by_age")]
    if not aged:
        return []
    e = aged[-1]
    lines = ["", f"After {e['n_edits']} edits, the scored cases by when they were edited (oldest first; "
             "`edit_by_age` in evals.jsonl holds every row's):", "",
             "| edits | cases | efficacy | paraphrase | neighbourhood | Score |", "|---|---|---|---|---|---|"]
    for b in e["edit_by_age"]:
        if not b["n"]:
            lines.append(f"| {b['first']}–{b['last']} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {b['first']}–{b['last']} | {b['n']} | {b['efficacy']:.3f} | {b['paraphrase']:.3f} | "
                     f"{b['neighborhood']:.3f} | {b['score']:.3f} |")
    return lines


def plot_report(rep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ev = rep["evaluations"]
    n = [e["n_edits"] for e in ev]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    for k in ("efficacy", "paraphrase", "neighborhood", "score"):
        ax[0].plot(n, [e["edit"][k] for e in ev], marker="o", label=k)
    ax[0].set(title="edit metrics (cases edited so far)", xlabel="edits", ylim=(0, 1.05))
    ax[0].legend()
    for k in ev[0]["general"]:
        ax[1].plot(n, [e["retention"][k] for e in ev], marker="o", label=k)
    ax[1].set(title="general capability (relative to unedited)", xlabel="edits")
    if ev[0]["general"]:
        ax[1].legend()
    for l in ev[0]["stability"]:
        ax[2].plot(n, [e["stability_ratio"][l]["fro"] for e in ev], marker=".", label=f"layer {l}")
        ax[3].plot(n, [e["stability_ratio"][l]["kappa"] for e in ev], marker=".", label=f"layer {l}")
    ax[2].set(title="‖W‖_F / ‖W0‖_F", xlabel="edits")
    ax[3].set(title="κ₂(W) / κ₂(W0)", xlabel="edits")
    ax[2].legend()
    fig.suptitle(f"{rep['config'].get('preset') or rep['method']} on {rep['model']}: {rep['n_edits']} sequential edits")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _lam_text(cfg: dict) -> str:
    lam = cfg.get("lam")
    if (cfg.get("rule_hparams") or {}).get("lam_unit") == "per_dim":
        return f"λ = {lam:.4g} per dimension of the rotated space"
    return f"λ = {lam:.4g}" if isinstance(lam, (int, float)) else f"λ = {lam}"


def before_after_summary(rep: dict) -> str:
    b, a = rep["before"], rep["after"]
    cfg = rep["config"]
    lines = [
        f"# MOSE sequential editing: {rep['model']}", "",
        f"{rep['n_edits']} sequential edits (batch 1), preset `{cfg.get('preset') or 'custom'}`, "
        f"layers {cfg['layers']}, {_lam_text(cfg)}, "
        f"commit {rep['commit']}, {rep['date']}, {rep['machine']}.",
        f"Protocol: {rep['protocol']}.", "",
        "| metric | before | after |", "|---|---|---|",
        f"| efficacy P(new) > P(true) | {b['efficacy']:.3f} | {a['efficacy']:.3f} |",
        f"| paraphrase success | {b['paraphrase']:.3f} | {a['paraphrase']:.3f} |",
        f"| neighbourhood success P(true) > P(new) | {b['neighborhood']:.3f} | {a['neighborhood']:.3f} |",
        f"| Score (harmonic mean) | {b['score']:.3f} | {a['score']:.3f} |",
        f"| mean NLL of target_new on rewrite prompt | {b['rewrite_nll_new']:.3f} | {a['rewrite_nll_new']:.3f} |", "",
        f"Mean change of the neighbourhood prompts' NLL of their true answer: "
        f"{rep['neighborhood_nll_true_change']:+.4f} nats.", "",
        "| layer | ‖W‖_F after/before | κ₂ after/before | κ₂ before |", "|---|---|---|---|",
    ]
    for l, s in rep["stability"].items():
        lines.append(f"| {l} | {s['fro_ratio']:.12f} | {s['kappa_ratio']:.12f} | {s['before']['kappa']:.2f} |")
    sp = rep["seconds_per_edit"]
    lines += ["", "Seconds per edit: " + ", ".join(f"{k} {v:.2f}" for k, v in sp.items()) +
              f"; one-time setup (C0, templates) {rep['setup_seconds']:.0f} s; wall {rep['wall_seconds']:.0f} s; "
              f"max ‖RᵀR − I‖_F = {rep['max_orth_error']:.2e}.", ""]
    return "\n".join(lines)

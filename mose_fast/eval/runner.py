"""Long sequential-editing runs with periodic evaluation, resumable from their journal.

Folder layout of a run (``--out runs/NAME``)::

    run.json          what the run is (model, config, settings, case ids); checked on resume
    w0.safetensors    the unedited matrices (for ‖W − W0‖_F)
    state.safetensors edited matrices + retention Grams after ``n_done`` edits (atomic replace)
    journal.jsonl     one line per edit (its record), in order
    evals.jsonl       one line per evaluation (edits so far, general capability, stability)
    report.json, summary.md, plots.png

Crash safety: an edit's journal line is written *before* the state that includes it, and the
state file names how many edits it holds.  On resume the state is loaded and journal/eval lines
past it are dropped, so an edit interrupted anywhere is redone exactly once from the state it
started from: no edit is lost and none is applied twice.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
import logging

from ..config import MOSEConfig
from ..editor import MOSEEditor, spectrum
from ..requests import EditRequest
from ..memit.stats import default_data_dir
from .general import perplexity, task_accuracy
from .metrics import landed, score_cases, summarize, token_scores

log = logging.getLogger(__name__)


# MOSEConfig fields that do not change the edits: a run may resume with other values.
BOOKKEEPING = ("undo_history", "stats_cache_dir")


@dataclass
class EvalSettings:
    eval_every: int = 100
    batch_size: int = 1
    glue_tasks: tuple[str, ...] = ("sst2",)
    glue_n: int = 200
    ppl_tokens: int = 20_000
    data_dir: str | None = None
    checkpoint_every: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["glue_tasks"] = list(self.glue_tasks)
        return d


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def machine() -> str:
    return f"{platform.machine()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


# --- evaluation at one point of the run ---------------------------------------------------------

def evaluate(editor: MOSEEditor, requests: list[EditRequest], settings: EvalSettings, W0: dict[int, torch.Tensor],
             n_done: int, locality_reference: list[list[int]] | None = None) -> dict:
    model, tok = editor.model, editor.tok
    data = Path(settings.data_dir) if settings.data_dir else default_data_dir()
    t = time.perf_counter()
    out: dict = {"n_edits": n_done}
    cases = requests[:n_done] if n_done else requests
    scores = score_cases(model, tok, cases)
    out["edit"] = summarize(scores)
    out["edit"]["cases"] = "edited so far" if n_done else "all cases of the run, before editing"
    tokens = token_scores(model, tok, cases, locality_reference)
    out["locality_predictions"] = tokens.pop("locality_predictions")
    out["edit_token"] = tokens
    out["general"] = {task: task_accuracy(model, tok, data, task, settings.glue_n)["accuracy"]
                      for task in settings.glue_tasks}
    if settings.ppl_tokens:
        out["general"]["perplexity"] = perplexity(model, tok, data / "wikitext-2" / "test.txt",
                                                  settings.ppl_tokens)["perplexity"]
    out["stability"] = {}
    for l in editor.cfg.layers:
        s = editor.spectrum(l)
        s["dist_w0"] = float(torch.linalg.matrix_norm(editor.arch.weight_view(model, l).double() - W0[l].double()))
        out["stability"][str(l)] = s
    out["seconds"] = time.perf_counter() - t
    return out


# --- the run ------------------------------------------------------------------------------------

def run_eval(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path,
             settings: EvalSettings | None = None, model_name: str = "", progress: bool = True,
             extend: bool = False, initial_eval_from: str | Path | None = None) -> dict:
    """Sequential edits of ``requests`` with an evaluation every ``settings.eval_every`` edits.

    ``extend``: the folder holds a run over a prefix of ``requests``; continue it to all of them
    (the pre-edit row then scores the original prefix only).  ``initial_eval_from``: a run folder
    of the same model, cases and evaluation settings whose pre-edit evaluation (row 0, identical
    for every method: the model is not edited yet) is reused instead of recomputed."""
    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"model": model_name, "config": cfg.to_dict(), "settings": settings.to_dict(),
                "case_ids": [r.case_id for r in requests], "method": cfg.method}
    run_file = out / "run.json"
    if run_file.is_file():
        stored = json.loads(run_file.read_text())
        for k in ("model", "config", "settings", "case_ids", "method"):
            mine, theirs = json.loads(json.dumps(identity[k])), stored.get(k)
            if k == "config":   # fields that do not change what the edits compute
                mine, theirs = (None if d is None else {f: v for f, v in d.items() if f not in BOOKKEEPING}
                                for d in (mine, theirs))
                if mine is not None and theirs is not None:
                    # a field added to MOSEConfig after the run was made: its default reproduces what
                    # the run computed (that is the rule for new fields), so only a non-default differs
                    defaults = MOSEConfig().to_dict()
                    mine = {f: v for f, v in mine.items() if f in theirs or v != defaults.get(f, object())}
            if k == "case_ids" and mine != theirs and extend and len(mine) > len(theirs) \
                    and mine[:len(theirs)] == theirs:
                stored.setdefault("extended", []).append({"from": len(theirs), "to": len(mine),
                                                          "commit": git_commit(), "at": time.strftime("%F %T")})
                stored["case_ids"] = mine
                run_file.write_text(json.dumps(stored))
                continue
            if mine != theirs:
                hint = (" (these cases continue its cases: pass extend=True / --extend to go on)"
                        if k == "case_ids" and mine[:len(theirs or [])] == theirs else "")
                raise ValueError(f"{out} holds a different run ({k} differs){hint}; use another --out folder")
    else:
        run_file.write_text(json.dumps({**identity, "commit": git_commit(), "started": time.strftime("%F %T")}))

    editor = MOSEEditor(model, tok, cfg, progress=progress)
    editor._prepare()
    editor.context_templates()   # from the unedited model, also when resuming an edited state
    w0_file = out / "w0.safetensors"
    if not w0_file.is_file():
        _atomic_save({f"W{l}": editor.arch.weight_view(model, l).contiguous() for l in cfg.layers}, w0_file, {})
    W0 = {l: t for l, t in ((int(k[1:]), v) for k, v in load_file(str(w0_file)).items())}

    n_done = _restore_state(editor, out / "state.safetensors")
    if n_done:   # provenance: which code ran which edits
        stored = json.loads(run_file.read_text())
        stored.setdefault("resumes", []).append({"n_done": n_done, "commit": git_commit(), "at": time.strftime("%F %T")})
        run_file.write_text(json.dumps(stored))
    journal = _read_lines(out / "journal.jsonl", lambda e: e["index"] < n_done)
    evals = _read_lines(out / "evals.jsonl", lambda e: e["n_edits"] <= n_done)
    if not evals:
        if initial_eval_from is not None:
            evals.append(_borrow_initial_eval(Path(initial_eval_from), identity, run_file, W0))
        else:
            evals.append(evaluate(editor, requests, settings, W0, 0))
        # pre-edit argmax tokens on the locality prompts: the token protocol's locality reference
        (out / "locality_ref.json").write_text(json.dumps(evals[-1]["locality_predictions"]))
        _append(out / "evals.jsonl", evals[-1])
    locality_ref = json.loads((out / "locality_ref.json").read_text())
    for e in evals:
        e.pop("locality_predictions", None)

    bs = settings.batch_size

    def due(n: int) -> bool:   # an evaluation point: every eval_every edits, and the end of the run
        return n == len(requests) or n % settings.eval_every < bs

    def evaluate_now() -> None:
        evals.append(evaluate(editor, requests, settings, W0, n_done, locality_ref))
        evals[-1].pop("locality_predictions", None)
        _append(out / "evals.jsonl", evals[-1])

    # The state is checkpointed before an evaluation: a run killed during one resumes at an
    # evaluation point with that evaluation missing.  Do it now, before editing on.
    if n_done and due(n_done) and evals[-1]["n_edits"] != n_done:
        evaluate_now()
    bar = tqdm(total=len(requests), initial=n_done, desc="sequential edits", unit="edit", disable=not progress)
    t_run = time.perf_counter()
    while n_done < len(requests):
        batch = requests[n_done:n_done + bs]
        rec = editor.edit(batch)
        # "index": the position of the batch's first case in the run (what resume, the landed windows
        # and the report count in); the editor's own record index counts edit calls, i.e. batches
        entry = {**rec.to_dict(), "index": n_done, "edit_call": rec.index, "case_ids": [r.case_id for r in batch],
                 "landed": landed(editor.model, editor.tok, batch)}
        _append(out / "journal.jsonl", entry)
        journal.append(entry)
        n_done += len(batch)
        last = n_done == len(requests)
        if last or n_done % settings.checkpoint_every < bs:
            _save_state(editor, out / "state.safetensors", n_done)
        if due(n_done):
            evaluate_now()
            if not last:   # an evaluation must not be redone on resume: checkpoint with it
                _save_state(editor, out / "state.safetensors", n_done)
        bar.update(len(batch))
    bar.close()
    report = build_report(identity, journal, evals, time.perf_counter() - t_run, _provenance(run_file))
    write_report(report, out)
    return report


# Settings that change what the pre-edit evaluation measures (the rest only schedule the run).
INITIAL_EVAL_SETTINGS = ("glue_tasks", "glue_n", "ppl_tokens")


def _borrow_initial_eval(source: Path, identity: dict, run_file: Path, W0: dict[int, torch.Tensor]) -> dict:
    """Row 0 of another run over the same model, cases and evaluation settings (checked), recorded
    in this run's run.json as ``initial_eval_from``; its stability columns are this run's own
    layers, from their unedited matrices ``W0``."""
    src_run = source / "run.json"
    if not src_run.is_file():
        raise FileNotFoundError(f"initial_eval_from: {source} is not a run folder (no run.json)")
    theirs = json.loads(src_run.read_text())
    rows = _read_lines(source / "evals.jsonl", lambda e: e["n_edits"] == 0, rewrite=False)
    if not rows or "locality_predictions" not in rows[0]:
        raise ValueError(f"initial_eval_from: {source} has no pre-edit evaluation")
    # row 0 scored the source's first n cases (all of them, unless the source was extended since)
    scored = theirs.get("case_ids", [])[:rows[0]["edit"]["n"]]
    differs = [k for k in ("model",) if theirs.get(k) != identity[k]]
    differs += ["case_ids"] if scored != identity["case_ids"] else []
    differs += [f"settings.{k}" for k in INITIAL_EVAL_SETTINGS
                if theirs.get("settings", {}).get(k) != identity["settings"][k]]
    if differs:
        raise ValueError(f"initial_eval_from: {source} evaluated something else ({', '.join(differs)} differ)")
    stored = json.loads(run_file.read_text())
    stored["initial_eval_from"] = {"folder": str(source), "commit": theirs.get("commit")}
    run_file.write_text(json.dumps(stored))
    row = rows[0]
    row["stability"] = {str(l): {**spectrum(W), "dist_w0": 0.0} for l, W in sorted(W0.items())}
    return row


def _provenance(run_file: Path) -> dict:
    stored = json.loads(run_file.read_text())
    return {"started_commit": stored.get("commit"), "started": stored.get("started"),
            "resumes": stored.get("resumes", []), "extended": stored.get("extended", []),
            "initial_eval_from": stored.get("initial_eval_from")}


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "summary.md").write_text(markdown_summary(report))
    try:
        plot_report(report, out / "plots.png")
    except ImportError:   # matplotlib is the [eval] extra: say so rather than skip silently
        log.warning("matplotlib not installed (pip install 'mose-fast[eval]'): %s/plots.png not written", out)


def report_from_folder(out_dir: str | Path) -> dict:
    """Rebuild report.json / summary.md / plots.png from a run folder's journal and evaluations,
    finished or not (a partial run says how far it got)."""
    report = load_report(out_dir)
    write_report(report, Path(out_dir))
    return report


def load_report(out_dir: str | Path) -> dict:
    """The report of a run folder, built from its journal and evaluations; writes nothing."""
    out = Path(out_dir)
    if not (out / "run.json").is_file():
        raise FileNotFoundError(f"{out} is not a run folder (no run.json)")
    identity = json.loads((out / "run.json").read_text())
    journal = _read_lines(out / "journal.jsonl", lambda e: True, rewrite=False)
    evals = _read_lines(out / "evals.jsonl", lambda e: True, rewrite=False)
    for e in evals:
        e.pop("locality_predictions", None)
    if not evals:
        raise ValueError(f"{out} has no evaluation yet")
    return build_report({k: identity[k] for k in ("model", "config", "settings", "case_ids", "method")},
                        journal, evals, float("nan"), _provenance(out / "run.json"))


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _save_state(editor: MOSEEditor, path: Path, n_done: int) -> None:
    tensors = {}
    for l in editor.cfg.layers:
        tensors[f"W{l}"] = editor.arch.weight_view(editor.model, l).contiguous()
        if l in editor._master:
            tensors[f"M{l}"] = editor._master[l].contiguous()
    for l, t in editor.rule.snapshot().items():     # MOSE: retention Grams (+ memory); AlphaEdit: C_p
        tensors[f"S{l}"] = t.cpu().contiguous()
    _atomic_save(tensors, path, {"n_done": str(n_done)})


def _restore_state(editor: MOSEEditor, path: Path) -> int:
    if not path.is_file():
        return 0
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        n_done = int(f.metadata()["n_done"])
    tensors = load_file(str(path))
    device = next(editor.model.parameters()).device
    # rule state keys: a layer number, or a tagged name such as "E8" (MOSE's edit memory)
    editor.rule.restore({(int(k[1:]) if k[1:].isdigit() else k[1:]): v.to(device)
                         for k, v in tensors.items() if k.startswith("S")})
    with torch.no_grad():
        for l in editor.cfg.layers:
            editor.arch.weight_view(editor.model, l).copy_(tensors[f"W{l}"])
            if f"M{l}" in tensors:
                editor._master[l].copy_(tensors[f"M{l}"])
    editor._n_edits = n_done
    return n_done


def _read_lines(path: Path, keep, rewrite: bool = True) -> list[dict]:
    """Entries of a JSON-lines file that ``keep`` accepts; with ``rewrite`` the file is rewritten
    with just those (drops lines written after the last saved state, and a torn last line).
    Readers of a run that may still be going (``report``) pass rewrite=False."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(e):
            entries.append(e)
    if rewrite:
        path.write_text("".join(json.dumps(e, default=str) + "\n" for e in entries))
    return entries


def _append(path: Path, entry: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- reporting ----------------------------------------------------------------------------------

def build_report(identity: dict, journal: list[dict], evals: list[dict], wall: float,
                 provenance: dict | None = None) -> dict:
    base = evals[0]
    stages = ("targets", "keys", "solve", "apply", "total")
    prev = 0
    for e in evals:
        e["retention"] = {k: e["general"][k] / base["general"][k] for k in e["general"]}
        # share of the edits since the previous evaluation that succeeded right after being made
        # (journals written before this was recorded have no "landed": nan)
        window = [x for j in journal if prev <= j["index"] < e["n_edits"] for x in (j.get("landed") or [])]
        e["landed"] = statistics.mean(window) if window else float("nan")
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
    lines = [f"# {rep['method'].upper()} sequential editing: {rep['model']}{status}", "",
             f"{rep['n_edits']} sequential edits (batch {st['batch_size']}), layers {cfg['layers']}, λ = {cfg['lam']}; "
             f"report written at commit {rep['commit']}, {rep['date']}, {rep['machine']}.",
             _code_line(rep),
             f"Protocol: {rep['protocol']}.", "",
             "| edits | efficacy | paraphrase | neighbourhood | Score | rewrite acc | rephrase acc | locality | " +
             " | ".join(f"{k} (ret.)" for k in ev[0]["general"]) + " | max ‖W‖_F ratio−1 | max κ₂ ratio | landed |",
             "|---" * (10 + len(ev[0]["general"]) + 1) + "|"]
    for e in ev:
        m = e["edit"]
        gen = " | ".join(f"{e['general'][k]:.3f} ({e['retention'][k]:.3f})" for k in e["general"])
        fro = max(abs(r["fro"] - 1) for r in e["stability_ratio"].values())
        kap = max(r["kappa"] for r in e["stability_ratio"].values())
        t = e.get("edit_token", {})
        tok_cols = " | ".join(f"{t.get(k, float('nan')):.3f}" for k in ("rewrite_acc", "rephrase_acc", "locality"))
        lines.append(f"| {e['n_edits']} | {m['efficacy']:.3f} | {m['paraphrase']:.3f} | {m['neighborhood']:.3f} | "
                     f"{m['score']:.3f} | {tok_cols} | {gen} | {fro:.1e} | {kap:.6f} | {e.get('landed', float('nan')):.2f} |")
    sp, med = rep["seconds_per_edit"], rep.get("seconds_per_edit_median", {})
    if sp:
        lines += ["", "Seconds per edit, median (mean): " +
                  ", ".join(f"{k} {med.get(k, float('nan')):.2f} ({v:.2f})" for k, v in sp.items()) +
                  f"; max ‖RᵀR − I‖_F = {rep['max_orth_error']:.1e}."]
    lines += ["", f"Row 0 scores the run's first {ev[0]['edit'].get('n', '')} cases before any edit; "
              "row k the k cases edited so far, "
              "after k edits. Columns 2-5: probability-comparison protocol; 6-8: token-accuracy protocol "
              "(teacher-forced target-token accuracy; locality = agreement with the pre-edit argmax tokens). "
              "Landed: share of the edits since the previous row that succeeded (efficacy) right after being made. "
              "Retention = value / value before editing (perplexity: ratio, lower is better)."]
    return "\n".join(lines) + "\n"


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
    ax[1].legend()
    for l in ev[0]["stability"]:
        ax[2].plot(n, [e["stability_ratio"][l]["fro"] for e in ev], marker=".", label=f"layer {l}")
        ax[3].plot(n, [e["stability_ratio"][l]["kappa"] for e in ev], marker=".", label=f"layer {l}")
    ax[2].set(title="‖W‖_F / ‖W0‖_F", xlabel="edits")
    ax[3].set(title="κ₂(W) / κ₂(W0)", xlabel="edits")
    ax[2].legend()
    fig.suptitle(f"{rep['method'].upper()} on {rep['model']}: {rep['n_edits']} sequential edits")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- short before/after run (the issue-2 experiment) ----------------------------------------------

def run_sequential(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path | None = None,
                   model_name: str = "", progress: bool = True) -> dict:
    """Scores before, len(requests) sequential edits, scores after, spectra, timing by stage."""
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
        "date": time.strftime("%F %T"), "machine": machine(), "config": cfg.to_dict(),
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
        (out / "summary.md").write_text(before_after_summary(report))
    return report


def before_after_summary(rep: dict) -> str:
    b, a = rep["before"], rep["after"]
    cfg = rep["config"]
    lines = [
        f"# MOSE sequential editing: {rep['model']}", "",
        f"{rep['n_edits']} sequential edits (batch 1), layers {cfg['layers']}, λ = {cfg['lam']}, "
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

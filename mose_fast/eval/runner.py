"""Long sequential-editing runs with periodic evaluation, resumable from their run folder
(``store.RunFolder``); and the short before/after run.  Uses only the editor's public API."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import MOSEConfig
from ..editor import MOSEEditor, spectrum
from ..hf.scoring import landed
from ..memit.stats import default_data_dir
from ..requests import EditRequest
from .general import perplexity, task_accuracy
from .metrics import score_cases, summarize, token_scores
from .report import before_after_summary, build_report, git_commit, machine
from .store import INITIAL_EVAL_SETTINGS, RunFolder, read_lines, write_report


@dataclass
class EvalSettings:
    eval_every: int = 100
    batch_size: int = 1
    glue_tasks: tuple[str, ...] = ("sst2",)
    glue_n: int = 200
    ppl_tokens: int = 20_000
    data_dir: str | None = None
    checkpoint_every: int = 1       # edits (batches) between saved states; evaluation points always save

    def to_dict(self) -> dict:
        d = asdict(self)
        d["glue_tasks"] = list(self.glue_tasks)
        return d

    def validate(self) -> None:
        """Settings and the data they read, checked before any model is loaded."""
        from .general import TASKS
        for name in ("eval_every", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"evaluation setting {name} = {v!r}: must be an integer ≥ 1")
        if self.glue_n < 1 or self.ppl_tokens < 0:
            raise ValueError(f"evaluation settings glue_n = {self.glue_n}, ppl_tokens = {self.ppl_tokens}: need ≥ 1 / ≥ 0")
        data = Path(self.data_dir) if self.data_dir else default_data_dir()
        for task in self.glue_tasks:
            if task not in TASKS:
                raise ValueError(f"glue task {task!r}: choose from {sorted(TASKS)}")
            if not (data / "glue" / f"{task}.json").is_file():
                raise FileNotFoundError(f"{data / 'glue' / f'{task}.json'} not found (set --data-dir or MOSE_DATA_DIR)")
        if self.ppl_tokens and not (data / "wikitext-2" / "test.txt").is_file():
            raise FileNotFoundError(f"{data / 'wikitext-2' / 'test.txt'} not found (set --data-dir or MOSE_DATA_DIR)")


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
        W = editor.arch.weight_view(model, l)
        s["dist_w0"] = float(torch.linalg.matrix_norm(W.double() - W0[l].to(W.device).double()))
        out["stability"][str(l)] = s
    out["seconds"] = time.perf_counter() - t
    return out


# --- the run ------------------------------------------------------------------------------------

def run_identity(model_name: str, cfg: MOSEConfig, settings: EvalSettings, requests: list[EditRequest]) -> dict:
    return {"model": model_name, "config": cfg.to_dict(), "settings": settings.to_dict(),
            "case_ids": [r.case_id for r in requests], "method": cfg.method}


def run_eval(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path,
             settings: EvalSettings | None = None, model_name: str = "", progress: bool = True,
             extend: bool = False, initial_eval_from: str | Path | None = None) -> dict:
    """Sequential edits of ``requests`` in batches of ``settings.batch_size``, with an evaluation
    every ``settings.eval_every`` edits; resumable (see ``store``).

    ``extend``: the folder holds a run over a prefix of ``requests``; continue it to all of them.
    ``initial_eval_from``: a run folder of the same model, cases and evaluation settings whose
    pre-edit evaluation (identical for every method: the model is not edited yet) is reused."""
    settings = settings or EvalSettings()
    settings.validate()
    cfg.validate()
    editor = MOSEEditor(model, tok, cfg, progress=progress, data_dir=settings.data_dir)
    editor.validate(requests)
    folder = RunFolder(out_dir)
    identity = run_identity(model_name, cfg, settings, requests)
    folder.check_or_start(identity, extend)

    editor.prepare()       # statistics and templates from the unedited model, also when resuming
    folder.save_w0({l: editor.arch.weight_view(model, l) for l in cfg.layers})
    W0 = folder.load_w0()
    state, n_done = folder.load_state(next(model.parameters()).device)
    if state is not None:
        editor.load_state_dict(state)
        folder.note_resume(n_done)
    journal = folder.journal(lambda e: e["index"] < n_done)
    evals = folder.evals(lambda e: e["n_edits"] <= n_done)
    if not evals:
        if initial_eval_from is not None:
            evals.append(_borrow_initial_eval(Path(initial_eval_from), identity, folder, W0))
        else:
            evals.append(evaluate(editor, requests, settings, W0, 0))
        # pre-edit argmax tokens on the locality prompts: the token protocol's locality reference
        folder.save_locality_ref(evals[-1]["locality_predictions"])
        folder.append_eval(evals[-1])
    locality_ref = folder.locality_ref()
    for e in evals:
        e.pop("locality_predictions", None)

    bs = settings.batch_size

    def due(n: int) -> bool:   # an evaluation point: every eval_every edits, and the end of the run
        return n == len(requests) or n % settings.eval_every < bs

    def evaluate_now() -> None:
        evals.append(evaluate(editor, requests, settings, W0, n_done, locality_ref))
        evals[-1].pop("locality_predictions", None)
        folder.append_eval(evals[-1])

    # The state is saved before an evaluation: a run killed during one resumes at an evaluation
    # point with that evaluation missing.  Do it now, before editing on.
    if n_done and due(n_done) and evals[-1]["n_edits"] != n_done:
        evaluate_now()
    bar = tqdm(total=len(requests), initial=n_done, desc="sequential edits", unit="edit", disable=not progress)
    t_run = time.perf_counter()
    since_checkpoint = 0
    while n_done < len(requests):
        batch = requests[n_done:n_done + bs]
        rec = editor.edit(batch)
        # "index": the position of the batch's first case in the run (what resume, the landed windows
        # and the report count in); the editor's own record index counts edit calls, i.e. batches
        entry = {**rec.to_dict(), "index": n_done, "edit_call": rec.index, "case_ids": [r.case_id for r in batch],
                 "landed": landed(editor.model, editor.tok, batch)}
        if due(n_done + len(batch)) and editor.modules != ["mlp.down"]:
            # ‖W‖_F, σ_max, σ_min, κ₂ of every matrix the other modules rotate (the evaluation's
            # stability columns cover mlp.down), at the evaluation points
            entry["unit_spectra"] = editor.unit_spectra()
        folder.append_journal(entry)
        journal.append(entry)
        n_done += len(batch)
        since_checkpoint += 1
        last = n_done == len(requests)
        if last or due(n_done) or since_checkpoint >= settings.checkpoint_every:
            folder.save_state(editor.state_dict(), n_done)
            since_checkpoint = 0
        if due(n_done):
            evaluate_now()
        bar.update(len(batch))
    bar.close()
    report = build_report(identity, journal, evals, time.perf_counter() - t_run, folder.provenance())
    write_report(report, folder.path)
    return report


def _borrow_initial_eval(source: Path, identity: dict, folder: RunFolder, W0: dict[int, torch.Tensor]) -> dict:
    """Row 0 of another run over the same model, cases and evaluation settings (checked), recorded
    in this run's run.json as ``initial_eval_from``; its stability columns are this run's own
    layers, from their unedited matrices ``W0``."""
    theirs_folder = RunFolder(source)
    if not theirs_folder.exists():
        raise FileNotFoundError(f"initial_eval_from: {source} is not a run folder (no run.json)")
    theirs = theirs_folder.read_identity()
    rows = read_lines(source / "evals.jsonl", lambda e: e["n_edits"] == 0, rewrite=False)
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
    folder.note("initial_eval_from", {"folder": str(source), "commit": theirs.get("commit")})
    row = rows[0]
    row["stability"] = {str(l): {**spectrum(W), "dist_w0": 0.0} for l, W in sorted(W0.items())}
    return row


# --- short before/after run -----------------------------------------------------------------------

def run_sequential(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path | None = None,
                   model_name: str = "", progress: bool = True, data_dir: str | Path | None = None) -> dict:
    """Scores before, len(requests) sequential edits, scores after, spectra, timing by stage."""
    editor = MOSEEditor(model, tok, cfg, progress=progress, data_dir=data_dir)
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
        "statistics_corpus": editor.statistics_corpus_name,
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

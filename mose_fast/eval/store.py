"""The run folder of a long evaluation run: what it holds, and how it survives being killed.

    run.json          what the run is (model, config, settings, case ids); checked on resume
    w0.safetensors    the unedited matrices (for ‖W − W0‖_F)
    state.safetensors the editor's state (``MOSEEditor.state_dict()``) after ``n_done`` edits
    journal.jsonl     one line per edit (its record), in order
    evals.jsonl       one line per evaluation (edits so far, general capability, stability)
    locality_ref.json the unedited model's argmax tokens on the locality prompts
    report.json, summary.md, plots.png

Crash safety: an edit's journal line is written *before* the state that includes it, and the
state file names how many edits it holds.  On resume the state is loaded and journal/eval lines
past it are dropped, so an edit interrupted anywhere is redone exactly once from the state it
started from: no edit is lost and none is applied twice.  ``run.json`` is written only once the
run's settings have been checked, so a start that fails leaves nothing that blocks the corrected
command.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .report import build_report, git_commit, markdown_summary, plot_report

# MOSEConfig fields that do not change the edits: a run may resume with other values.
BOOKKEEPING = ("undo_history", "stats_cache_dir", "preset", "target_batch")
IDENTITY = ("model", "config", "settings", "case_ids", "method")
# Settings that change what the pre-edit evaluation measures (the rest only schedule the run).
INITIAL_EVAL_SETTINGS = ("glue_tasks", "glue_n", "ppl_tokens", "sample", "sample_seed")
SCHEDULE_SETTINGS = ("checkpoint_every", "data_dir")


def _comparable(key: str, value):
    value = json.loads(json.dumps(value))
    if key == "config" and isinstance(value, dict):
        return {f: v for f, v in value.items() if f not in BOOKKEEPING}
    if key == "settings" and isinstance(value, dict):
        return {f: v for f, v in value.items() if f not in SCHEDULE_SETTINGS}
    return value


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- identity -------------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    def exists(self) -> bool:
        return self.run_file.is_file()

    def read_identity(self) -> dict:
        return json.loads(self.run_file.read_text())

    def check(self, identity: dict, extend: bool = False) -> None:
        """ValueError if the folder holds another run than ``identity`` (nothing is written)."""
        if not self.exists():
            if self.path.exists() and not self.path.is_dir():
                raise ValueError(f"run folder {self.path} exists and is not a folder")
            return
        stored = self.read_identity()
        for k in IDENTITY:
            mine, theirs = _comparable(k, identity[k]), _comparable(k, stored.get(k))
            if k == "case_ids" and extend and len(mine) >= len(theirs) and mine[:len(theirs)] == theirs:
                continue
            if mine != theirs:
                hint = (" (these cases continue its cases: pass extend=True / --extend to go on)"
                        if k == "case_ids" and mine[:len(theirs or [])] == theirs else "")
                raise ValueError(f"{self.path} holds a different run ({k} differs){hint}; use another --out folder")

    def check_or_start(self, identity: dict, extend: bool = False) -> None:
        """Start the run (write run.json), or check the folder holds this very run.  ``extend``:
        the stored cases are a prefix of these, and the run goes on to all of them."""
        self.check(identity, extend)
        if not self.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_json({**identity, "commit": git_commit(), "started": time.strftime("%F %T")})
            return
        stored = self.read_identity()
        if identity["case_ids"] != stored.get("case_ids"):      # check() allowed it: an extension
            stored.setdefault("extended", []).append({"from": len(stored.get("case_ids", [])),
                                                      "to": len(identity["case_ids"]),
                                                      "commit": git_commit(), "at": time.strftime("%F %T")})
            stored["case_ids"] = identity["case_ids"]
            self._write_json(stored)

    def note_resume(self, n_done: int) -> None:
        stored = self.read_identity()
        stored.setdefault("resumes", []).append({"n_done": n_done, "commit": git_commit(),
                                                 "at": time.strftime("%F %T")})
        self._write_json(stored)

    def note(self, key: str, value) -> None:
        stored = self.read_identity()
        stored[key] = value
        self._write_json(stored)

    def provenance(self) -> dict:
        stored = self.read_identity()
        return {"started_commit": stored.get("commit"), "started": stored.get("started"),
                "resumes": stored.get("resumes", []), "extended": stored.get("extended", []),
                "initial_eval_from": stored.get("initial_eval_from"),
                "statistics_corpus": stored.get("statistics_corpus")}

    def _write_json(self, data: dict) -> None:
        tmp = self.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.run_file)

    # --- tensors --------------------------------------------------------------------------------
    def save_w0(self, weights: dict[int, torch.Tensor]) -> None:
        path = self.path / "w0.safetensors"
        if not path.is_file():
            atomic_save({f"W{l}": w.detach().to("cpu").contiguous() for l, w in weights.items()}, path, {})

    def load_w0(self) -> dict[int, torch.Tensor]:
        return {int(k[1:]): v for k, v in load_file(str(self.path / "w0.safetensors")).items()}

    def save_state(self, state: dict[str, torch.Tensor], n_done: int) -> None:
        atomic_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                    self.path / "state.safetensors", {"n_done": str(n_done)})

    def load_state(self, device=None) -> tuple[dict[str, torch.Tensor] | None, int]:
        path = self.path / "state.safetensors"
        if not path.is_file():
            return None, 0
        with safe_open(str(path), "pt") as f:
            n_done = int(f.metadata()["n_done"])
        return load_file(str(path), device=str(device or "cpu")), n_done

    # --- lines ----------------------------------------------------------------------------------
    def journal(self, keep=lambda e: True, rewrite: bool = True) -> list[dict]:
        return read_lines(self.path / "journal.jsonl", keep, rewrite)

    def evals(self, keep=lambda e: True, rewrite: bool = True) -> list[dict]:
        return read_lines(self.path / "evals.jsonl", keep, rewrite)

    def append_journal(self, entry: dict) -> None:
        append_line(self.path / "journal.jsonl", entry)

    def append_eval(self, entry: dict) -> None:
        append_line(self.path / "evals.jsonl", entry)

    def save_locality_ref(self, predictions) -> None:
        (self.path / "locality_ref.json").write_text(json.dumps(predictions))

    def locality_ref(self):
        return json.loads((self.path / "locality_ref.json").read_text())


def atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_lines(path: Path, keep, rewrite: bool = True) -> list[dict]:
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


def append_line(path: Path, entry: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- reports of a folder ------------------------------------------------------------------------

def write_report(report: dict, out: Path) -> None:
    import logging
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "summary.md").write_text(markdown_summary(report))
    try:
        plot_report(report, out / "plots.png")
    except ImportError:   # matplotlib is the [eval] extra: say so rather than skip silently
        logging.getLogger(__name__).warning(
            "matplotlib not installed (pip install 'mose-fast[eval]'): %s/plots.png not written", out)


def load_report(out_dir: str | Path) -> dict:
    """The report of a run folder, built from its journal and evaluations; writes nothing."""
    folder = RunFolder(out_dir)
    if not folder.exists():
        raise FileNotFoundError(f"{folder.path} is not a run folder (no run.json)")
    identity = folder.read_identity()
    journal = folder.journal(rewrite=False)
    evals = folder.evals(rewrite=False)
    for e in evals:
        e.pop("locality_predictions", None)
    if not evals:
        raise ValueError(f"{folder.path} has no evaluation yet")
    return build_report({k: identity.get(k) for k in IDENTITY}, journal, evals, float("nan"), folder.provenance())


def report_from_folder(out_dir: str | Path) -> dict:
    """Rebuild report.json / summary.md / plots.png from a run folder's journal and evaluations,
    finished or not (a partial run says how far it got)."""
    report = load_report(out_dir)
    write_report(report, Path(out_dir))
    return report

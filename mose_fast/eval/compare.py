"""Side-by-side table and plots of several run folders (MOSE and the additive baselines).

Each run is read with :func:`runner.load_report` (nothing is rewritten).  There is one table per
evaluation point, holding the runs evaluated there (runs of different lengths can be compared),
and only runs that edited the same cases in the same order up to that point; each run's ratios
(retention, ‖W‖_F, κ₂) are against its own unedited row 0.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .store import load_report, read_lines


def run_label(rep: dict) -> str:
    """The run's preset and every setting it overrides (or, for a run made before presets, its
    method and every rule option), plus the batch size when not 1: two runs that differ in any
    setting get different rows."""
    cfg = rep["config"]
    batch = rep.get("settings", {}).get("batch_size", 1)
    tail = [f"batch {batch}"] if batch != 1 else []
    name = cfg.get("preset")
    if name:
        from ..config import PRESETS, MOSEConfig
        if name in PRESETS:
            base = MOSEConfig.preset(name, layers=cfg["layers"]).to_dict() if cfg.get("layers") else {}
            skip = {"preset", "undo_history", "stats_cache_dir", "master_weights", "target_batch"}
            parts = []
            for k, v in cfg.items():
                if k in skip or base.get(k) == v:
                    continue
                if k == "rule_hparams":     # with the rule's defaults: an option left out differs too
                    mine = _rule_options(cfg.get("method"), v)
                    theirs = _rule_options(base.get("method"), base.get(k, {}))
                    parts += [f"{h}={_short(x)}" for h, x in mine.items() if h not in theirs or theirs[h] != x]
                else:
                    parts.append(f"{k}={_short(v)}")
            layers = cfg["layers"]
            default_layers = MOSEConfig.preset(name).layers
            if layers != default_layers:
                parts.insert(0, f"layers {_span(layers)}")
            parts += tail
            return name + (f" ({', '.join(parts)})" if parts else "")
    hp = cfg.get("rule_hparams") or {}
    parts = [f"{k}={_short(v)}" for k, v in hp.items()]
    if cfg["method"] == "mose":
        parts.insert(0, f"λ={cfg['lam']:g}")
    if cfg.get("land_retries"):
        parts.append(f"land_retries={cfg['land_retries']}×{cfg.get('land_boost', 4.0):g}")
    parts += tail
    return f"{cfg['method'].upper()} {_span(cfg['layers'])}" + (f" ({', '.join(parts)})" if parts else "")


def _rule_options(method, hparams: dict) -> dict:
    """The rule's options with its defaults filled in (as stored when the rule does not know them)."""
    from ..rules import rule_class
    try:
        return rule_class(method, hparams).check_options(hparams)
    except ValueError:
        return dict(hparams)


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _span(layers: list[int]) -> str:
    return f"L{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else f"L{layers}"


def _row(rep: dict, n: int, seconds: list[float]) -> dict:
    """The evaluation after ``n`` edits; ``seconds``: wall time per case of each edited case, in order."""
    e = next(e for e in rep["evaluations"] if e["n_edits"] == n)
    gen, ret = e["general"], e["retention"]
    fro = [r["fro"] for r in e["stability_ratio"].values()]
    kap = [r["kappa"] for r in e["stability_ratio"].values()]
    journal_med = statistics.median(seconds[:n]) if n and seconds[:n] else float("nan")
    return {"efficacy": e["edit"]["efficacy"], "paraphrase": e["edit"]["paraphrase"],
            "neighborhood": e["edit"]["neighborhood"], "score": e["edit"]["score"],
            "rewrite_acc": e.get("edit_token", {}).get("rewrite_acc", float("nan")),
            "control_score": e.get("control", {}).get("score", float("nan")),
            "landed": e.get("landed", float("nan")),
            "general": {k: (gen[k], ret[k]) for k in gen},
            "fro": max(fro, key=lambda x: abs(x - 1)), "kappa": max(kap, key=lambda x: abs(x - 1)),
            "seconds_median": journal_med}


def _last_by_age(rep: dict) -> dict | None:
    """The run's last evaluation that split its cases by when they were edited (``edit_by_age``)."""
    aged = [e for e in rep["evaluations"] if e.get("edit_by_age")]
    return {"n_edits": aged[-1]["n_edits"], "spans": aged[-1]["edit_by_age"]} if aged else None


def compare_runs(folders: list[str | Path], at: list[int] | None = None, labels: list[str] | None = None) -> dict:
    reps = [load_report(f) for f in folders]
    # wall seconds per case, one entry per case in run order (a batch's time is shared by its cases)
    seconds = [[j["seconds"]["total"] / len(j["case_ids"])
                for j in read_lines(Path(f) / "journal.jsonl", lambda e: True, rewrite=False) for _ in j["case_ids"]]
               for f in folders]
    labels = labels or [run_label(r) for r in reps]
    if len(labels) != len(reps):
        raise ValueError(f"{len(labels)} labels for {len(reps)} runs")
    models = {r["model"] for r in reps}
    if len(models) > 1:
        raise ValueError(f"runs of different models cannot be compared: {sorted(models)}")
    have = [{e["n_edits"] for e in r["evaluations"]} for r in reps]
    # default: the points at least two runs reached (a table of one row compares nothing)
    points = (sorted(n for n in set.union(*have) - {0} if sum(n in h for h in have) >= min(2, len(have)))
              if at is None else list(at))
    missing = [n for n in points if not any(n in h for h in have)]
    if missing:
        raise ValueError(f"no run has an evaluation at {missing} edits")
    table = {}
    for n in points:   # each table holds the runs evaluated at n, which must have edited the same cases
        idx = [i for i, h in enumerate(have) if n in h]
        ref = reps[idx[0]]["case_ids"][:n]
        bad = [str(folders[i]) for i in idx if reps[i]["case_ids"][:n] != ref]
        if bad:
            raise ValueError(f"runs {bad} edited other cases than {folders[idx[0]]} in their first {n} edits")
        table[n] = [{"label": labels[i], "folder": str(folders[i]), **_row(reps[i], n, seconds[i])} for i in idx]
    series = [{"label": lab, "n": [e["n_edits"] for e in r["evaluations"]],
               "rows": [_row(r, e["n_edits"], sec) for e in r["evaluations"]], "by_age": _last_by_age(r)}
              for lab, r, sec in zip(labels, reps, seconds)]
    return {"model": reps[0]["model"], "table": table, "series": series,
            "base": {lab: reps[i]["evaluations"][0]["general"] for i, lab in enumerate(labels)}}


def _fmt(x: float, spec: str) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def comparison_markdown(cmp: dict) -> str:
    lines = [f"# Side-by-side: {cmp['model']}", ""]
    for n, rows in cmp["table"].items():
        tasks = list(rows[0]["general"])
        control = any(not math.isnan(r["control_score"]) for r in rows)
        lines += [f"## after {n} sequential edits", "",
                  "| rule | efficacy | paraphrase | neighb. | Score | " + ("never-edited Score | " if control else "") +
                  "rewrite acc | landed | " + " | ".join(f"{t} (ratio)" for t in tasks) +
                  " | ‖W‖_F ratio | κ₂ ratio | s/case (median) |",
                  "|---" * (10 + len(tasks) + control) + "|"]
        best = max(r["score"] for r in rows)
        for r in rows:
            score = _fmt(r["score"], ".3f")
            gen = " | ".join(f"{_fmt(r['general'][t][0], '.3f')} ({_fmt(r['general'][t][1], '.3f')})" for t in tasks)
            lines.append(f"| {r['label']} | {_fmt(r['efficacy'], '.3f')} | {_fmt(r['paraphrase'], '.3f')} | "
                         f"{_fmt(r['neighborhood'], '.3f')} | {'**' + score + '**' if r['score'] == best else score} | "
                         + (f"{_fmt(r['control_score'], '.3f')} | " if control else "") +
                         f"{_fmt(r['rewrite_acc'], '.3f')} | {_fmt(r['landed'], '.2f')} | {gen} | "
                         f"{_fmt(r['fro'], '.6f')} | {_fmt(r['kappa'], '.4f')} | "
                         f"{_fmt(r['seconds_median'], '.2f')} |")
        lines.append("")
    lines += ["Efficacy, paraphrase, neighbourhood, Score: probability comparison over the cases edited so far; "
              "never-edited Score: the same on control cases the run never edits (`--control`: the drift the "
              "edited cases' Score includes); rewrite acc: teacher-forced target-token accuracy; "
              "landed: share of the edits since the previous "
              "evaluation that succeeded right after being made (nan: not recorded by that run). "
              "Ratios are against each run's unedited model "
              "(perplexity ratio: lower is better); ‖W‖_F and κ₂ ratio: the edited layer furthest from 1; "
              "s/case: median wall seconds of an edit divided by its number of cases (batch 1: per edit).", ""]
    return "\n".join(lines)


def plot_comparison(cmp: dict, path: Path) -> None:
    import itertools

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(cmp["series"][0]["rows"][0]["general"])
    # ‖W‖_F and κ₂ as |ratio − 1| on a log axis: a rotation stays at rounding level (1e-9),
    # additive rules climb by orders of magnitude, and both show on one panel.
    panels = [("score", "Score (cases edited so far)"), ("efficacy", "efficacy"), ("paraphrase", "paraphrase"),
              ("neighborhood", "neighbourhood")] + \
             [(t, f"{t}: value / unedited") for t in tasks] + \
             [("fro", "|‖W‖_F / ‖W0‖_F − 1| (furthest layer)"), ("kappa", "|κ₂(W) / κ₂(W0) − 1| (furthest layer)")]
    if any(s["by_age"] for s in cmp["series"]):
        panels.append(("age", "efficacy by when the case was edited\n(each run's last evaluation that splits it)"))
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    # the default cycle has 10 colours: beyond that, runs would share one
    colours = plt.cm.tab20.colors if len(cmp["series"]) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels):
        for s, colour in zip(cmp["series"], itertools.cycle(colours)):
            if key == "age":
                if s["by_age"]:
                    spans = [b for b in s["by_age"]["spans"] if b["n"]]
                    ax.plot([(b["first"] + b["last"]) / 2 for b in spans], [b["efficacy"] for b in spans], marker="o",
                            label=f"{s['label']} after {s['by_age']['n_edits']}", color=colour)
                continue
            pts = [(n, r["general"][key][1] if key in tasks else r[key]) for n, r in zip(s["n"], s["rows"])]
            if key == "score":      # the never-edited control cases, dashed, where the run scored them
                ctl = [(n, r["control_score"]) for n, r in zip(s["n"], s["rows"]) if not math.isnan(r["control_score"])]
                if ctl:
                    ax.plot([p[0] for p in ctl], [p[1] for p in ctl], linestyle="--", marker=".", color=colour,
                            label=f"{s['label']}: never-edited cases")
            if key in ("fro", "kappa"):
                pts = [(n, abs(y - 1)) for n, y in pts if n > 0]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s["label"], color=colour)
        ax.set(title=title, xlabel="edited at (edit number)" if key == "age" else "edits")
        if key in ("fro", "kappa", "perplexity"):    # perplexity: ×1.2 and ×130 on one panel
            ax.set_yscale("log")
        if key == "age":
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Sequential editing on {cmp['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_comparison(folders: list[str | Path], out_dir: str | Path, at: list[int] | None = None,
                     labels: list[str] | None = None) -> dict:
    cmp = compare_runs(folders, at, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(comparison_markdown(cmp))
    plot_comparison(cmp, out / "comparison.png")
    return cmp

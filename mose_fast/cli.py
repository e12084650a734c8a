"""``mose-fast`` command line: demo, edit, stats, eval."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEMO_REQUESTS = [
    dict(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English",
         target_true="French", paraphrase_prompts=["Danielle Darrieux grew up speaking"],
         neighborhood_prompts=["The mother tongue of Jean-Paul Sartre is"], neighborhood_answers=["French"]),
    dict(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
         target_true="Paris", paraphrase_prompts=["To visit the Eiffel Tower, you travel to the city of"],
         neighborhood_prompts=["The Louvre is located in the city of"], neighborhood_answers=["Paris"]),
    dict(prompt="Michael Jordan is a professional", subject="Michael Jordan", target_new="soccer",
         target_true="basketball", paraphrase_prompts=["Michael Jordan is famous for playing"],
         neighborhood_prompts=["LeBron James is a professional"], neighborhood_answers=["basketball"]),
]


def parse_layers(text: str) -> list[int]:
    """'4-8' or '4,5,6' → [4, 5, 6, 7, 8] / [4, 5, 6]."""
    try:
        if "-" in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like '4-8' or '4,5,6', got {text!r}") from None


def _config(args, model):
    from .config import MOSEConfig
    overrides = {}
    if getattr(args, "config", None):
        overrides.update(json.loads(Path(args.config).read_text()))
    for name in ("layers", "lam", "stats_tokens", "stats_corpus", "seed", "polar_method", "method", "edit_passes",
                 "land_retries", "land_boost"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return MOSEConfig.preset(model.config.model_type, **overrides)


def _add_common(p):
    p.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or 'smollm2-135m'")
    p.add_argument("--layers", type=parse_layers, help="edited layers, e.g. 4-8")
    p.add_argument("--lam", type=float, help="retention weight λ")
    p.add_argument("--stats-tokens", dest="stats_tokens", type=int, help="corpus tokens for C0")
    p.add_argument("--stats-corpus", dest="stats_corpus", help="text file for C0 (default: WikiText-2 valid)")
    p.add_argument("--polar-method", dest="polar_method",
                   help="svd (default) | eigh | newton_schulz[_fp32] | polar_express[_fp32] | cupy_gesvd[j] | subspace | krylov | randomized")
    p.add_argument("--edit-passes", dest="edit_passes", type=int,
                   help="passes over the layers per edit towards the same target (default 1)")
    p.add_argument("--land-retries", dest="land_retries", type=int,
                   help="MOSE: re-solve an edit up to N times while a request misses P(new) > P(true) (default 0)")
    p.add_argument("--land-boost", dest="land_boost", type=float,
                   help="MOSE: factor on a missed request's edit-term weight per retry (default 4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="JSON file of MOSEConfig fields")


def cmd_demo(args) -> int:
    from .editor import MOSEEditor
    from .eval.metrics import greedy_answer, score_cases
    from .hf.models import load_model
    from .requests import EditRequest
    print(f"Loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    cfg = _config(args, model)
    requests = [EditRequest(**r) for r in DEMO_REQUESTS]
    editor = MOSEEditor(model, tok, cfg)

    def show(title):
        scores = score_cases(model, tok, requests)
        print(f"\n=== {title} ===")
        for r, s in zip(requests, scores):
            print(f"  {r.text!r}")
            print(f"      greedy: {greedy_answer(model, tok, r.text)!r}")
            print(f"      NLL new {r.target_new!r} = {s.rewrite_nll_new:.2f} | NLL true {r.target_true!r} = "
                  f"{s.rewrite_nll_true:.2f} | efficacy {s.efficacy:.0f}")
            for p in r.paraphrase_prompts:
                print(f"    paraphrase {p!r} → {greedy_answer(model, tok, p)!r}")
            for p in r.neighborhood_prompts:
                print(f"    neighbour  {p!r} → {greedy_answer(model, tok, p)!r}")
    show("before editing")
    print(f"\nEditing layers {cfg.layers} with λ = {cfg.lam}, {len(requests)} sequential edits ...", flush=True)
    records = editor.edit_sequential(requests)
    show("after editing")
    print("\nPer edit (seconds: targets / keys / solve / apply), max ‖RᵀR−I‖_F, ‖W‖_F after/before:")
    for r, rec in zip(requests, records):
        s = rec.seconds
        ratio = max(abs(l.weight_norm_after / l.weight_norm_before - 1) for l in rec.layers)
        print(f"  {r.subject:20s} {s['targets']:.1f} / {s['keys']:.2f} / {s['solve']:.2f} / {s['apply']:.2f}"
              f"   orth {max(l.orth_error for l in rec.layers):.1e}   |ratio−1| ≤ {ratio:.1e}")
    return 0


def cmd_edit(args) -> int:
    from .editor import MOSEEditor
    from .hf.models import load_model
    from .requests import load_requests
    model, tok = load_model(args.model)
    cfg = _config(args, model)
    requests = load_requests(args.requests, limit=args.limit)
    editor = MOSEEditor(model, tok, cfg)
    if args.batch:
        editor.edit(requests)
    else:
        editor.edit_sequential(requests)
    out = editor.save(args.out)
    print(f"edited model and journal written to {out}")
    return 0


def cmd_stats(args) -> int:
    from .hf.arch import resolve_arch
    from .hf.models import load_model
    from .memit.stats import default_data_dir, key_second_moments
    model, tok = load_model(args.model)
    cfg = _config(args, model)
    corpus = cfg.stats_corpus or str(default_data_dir() / "wikitext-2" / "valid.txt")
    c0 = key_second_moments(model, tok, resolve_arch(model), cfg.layers, corpus, cfg.stats_tokens,
                            cfg.stats_seq_len, cfg.stats_batch_size, cfg.stats_cache_dir)
    for l, c in c0.items():
        print(f"layer {l}: C0 {tuple(c.shape)}, trace {float(c.trace()):.4f}")
    return 0


def cmd_eval(args) -> int:
    from .eval.runner import EvalSettings, run_eval, run_sequential
    from .hf.models import load_model
    from .requests import load_requests
    from .memit.stats import default_data_dir
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.dataset == "counterfact":
        path = data / "counterfact" / f"counterfact-{args.split}.json"
    elif args.dataset == "zsre":
        path = data / "zsre" / "zsre_mend_train-1k.json"
    else:
        path = Path(args.dataset)
    requests = load_requests(path, limit=args.n_edits, offset=args.offset)
    model, tok = load_model(args.model)
    cfg = _config(args, model)
    if args.before_after:
        run_sequential(model, tok, requests, cfg, args.out, model_name=args.model)
    else:
        settings = EvalSettings(eval_every=args.eval_every, batch_size=args.batch_size, glue_n=args.glue_n,
                                glue_tasks=tuple(args.glue_tasks.split(",")) if args.glue_tasks else (),
                                ppl_tokens=args.ppl_tokens, data_dir=str(data))
        run_eval(model, tok, requests, cfg, args.out, settings, model_name=args.model, extend=args.extend,
                 initial_eval_from=args.initial_eval_from)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def cmd_report(args) -> int:
    from .eval.runner import report_from_folder
    report_from_folder(args.out)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def cmd_compare(args) -> int:
    from .eval.compare import write_comparison
    at = [int(x) for x in args.at.split(",")] if args.at else None
    labels = args.labels.split(";") if args.labels else None
    write_comparison(args.runs, args.out, at, labels)
    print((Path(args.out) / "comparison.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="mose-fast", description="Multiplicative orthogonal sequential editing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="edit the embedded SmolLM2 and show answers before/after")
    _add_common(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("edit", help="apply edits from a JSON file and save the edited model")
    _add_common(p)
    p.add_argument("--requests", required=True, help="JSON file (ROME, EasyEdit or MEND schema)")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch", action="store_true", help="one batch edit instead of sequential edits")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_edit)
    p = sub.add_parser("stats", help="precompute and cache the key statistics C0")
    _add_common(p)
    p.set_defaults(fn=cmd_stats)
    p = sub.add_parser("eval", help="sequential edits with before/after metrics and stability")
    _add_common(p)
    p.add_argument("--method", help="mose (default), memit, rome, alphaedit, rect, prune; overrides --config")
    p.add_argument("--dataset", default="counterfact", help="'counterfact', 'zsre' or a JSON file of requests")
    p.add_argument("--split", default="edit", choices=["val", "edit"], help="CounterFact file")
    p.add_argument("--data-dir", help="folder with counterfact/, glue/, wikitext-2/ "
                                      "(default: $MOSE_DATA_DIR or ../shared/data)")
    p.add_argument("--n-edits", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--glue-tasks", default="sst2", help="comma-separated: sst2,mrpc,cola,rte,mmlu ('' for none)")
    p.add_argument("--glue-n", type=int, default=200)
    p.add_argument("--ppl-tokens", type=int, default=20000)
    p.add_argument("--before-after", action="store_true",
                   help="short run: scores before and after only, with per-stage timing")
    p.add_argument("--extend", action="store_true",
                   help="continue the run in --out (over the first cases) to --n-edits cases")
    p.add_argument("--initial-eval-from", dest="initial_eval_from", metavar="DIR",
                   help="reuse the pre-edit evaluation of another run folder (same model, cases, settings)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("report", help="rebuild report.json, summary.md and plots.png of a run folder")
    p.add_argument("--out", required=True, help="the run folder")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare", help="side-by-side table and plots of several run folders")
    p.add_argument("runs", nargs="+", help="run folders (same model and cases)")
    p.add_argument("--at", help="comma-separated edit counts (default: every evaluation the runs share)")
    p.add_argument("--labels", help="';'-separated row labels (default: method and its settings)")
    p.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    p.set_defaults(fn=cmd_compare)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mose-fast {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

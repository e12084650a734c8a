"""``mose-fast`` command line.

Every command checks what it can without the model first — files, schemas, presets and options,
layers against the model's config (read without its weights), the output folder — so a mistake is
reported in seconds, not after the model has loaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

DEMO_REQUESTS = [
    dict(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
         target_true="Paris", paraphrase_prompts=["To visit the Eiffel Tower, tourists travel to the city of"],
         neighborhood_prompts=["The Louvre museum is located in the city of"], neighborhood_answers=["Paris"]),
    dict(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English",
         target_true="French", paraphrase_prompts=["Danielle Darrieux grew up speaking"],
         neighborhood_prompts=["The mother tongue of Jean-Paul Sartre is"], neighborhood_answers=["French"]),
]


# what the demo says up front about its first run (measured: README, "Two commands")
FIRST_RUN_STATISTICS = ("about 2 minutes on a 2-core CPU: 30,000 tokens of text the model writes, then C0 over "
                        "them; about 1 minute from WikiText-2 when the data folder is there")


def parse_layers(text: str) -> list[int]:
    """'4-8' or '4,5,6' → [4, 5, 6, 7, 8] / [4, 5, 6]."""
    try:
        if "-" in text:
            a, b = text.split("-")
            out = list(range(int(a), int(b) + 1))
        else:
            out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like '4-8' or '4,5,6', got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no layers in {text!r}")
    return out


# flag → MOSEConfig field
OVERRIDES = ("layers", "modules", "lam", "stats_tokens", "stats_corpus", "seed", "polar_method", "land_retries",
             "land_boost")


def build_config(args, model_type: str | None):
    """The preset (``--preset``, or the config file's), the config file's fields, then the flags."""
    from .config import MOSEConfig
    fields: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: not valid JSON ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"config file {path}: expected a JSON object of MOSEConfig fields")
    where = args.config or "command line"
    if getattr(args, "preset", None):
        fields["preset"] = args.preset
    for name in OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return MOSEConfig.from_dict(fields, model_type, where=where)


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _edit_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated edit counts, got {text!r}") from None


def config_changes(cfg, model_type: str | None) -> list[str]:
    """``field: preset value → value`` for every field a configuration file or flag changed from its
    preset (``rule_hparams`` key by key)."""
    from .config import PRESETS, MOSEConfig
    if cfg.preset_name not in PRESETS:
        return []
    base, now = MOSEConfig.preset(cfg.preset_name, model_type).to_dict(), cfg.to_dict()
    pairs = [(k, base.get(k), now.get(k)) for k in sorted(set(base) | set(now)) if k != "rule_hparams"]
    b_rule, n_rule = base.get("rule_hparams") or {}, now.get("rule_hparams") or {}
    pairs += [(f"rule_hparams.{k}", b_rule.get(k), n_rule.get(k)) for k in sorted(set(b_rule) | set(n_rule))]
    return [f"{k}: {b!r} → {n!r}" for k, b, n in pairs if b != n]


def _describe(cfg, model_type: str | None = None) -> str:
    from .config import PRESETS
    name = cfg.preset_name or cfg.method
    summary = PRESETS[name].summary if name in PRESETS else ""
    changes = config_changes(cfg, model_type)
    changed = f", changed: {'; '.join(changes)}" if changes else ""
    return f"preset {name!r} ({summary}){changed}; layers {cfg.layers}"


def _model_checks(args):
    """(model config, MOSEConfig) with everything checked against the model's config — and a
    ``--stats`` file against the model's config and tokenizer."""
    from .hf.models import load_tokenizer, model_config
    mcfg = model_config(args.model)
    cfg = build_config(args, getattr(mcfg, "model_type", None))
    n_layers = getattr(mcfg, "num_hidden_layers", None)
    if n_layers is not None:
        cfg.validate_for_model(n_layers, args.config or "--layers")
    if getattr(args, "stats", None):
        from .memit.stats_file import check_statistics
        check_statistics(args.stats, mcfg, load_tokenizer(args.model), cfg.layers)
    return mcfg, cfg


def _load(args, tok=None):
    from .hf.models import load_model
    t = time.perf_counter()
    print(f"Loading {args.model} ...", flush=True)
    device_map = getattr(args, "device_map", None)
    model, tok = load_model(args.model, dtype=getattr(args, "dtype", None), device=getattr(args, "device", None),
                            device_map=device_map, tokenizer=tok)
    print(f"  loaded in {time.perf_counter() - t:.0f} s", flush=True)
    return model, tok


def _check_tokens(tok, requests) -> None:
    for r in requests:
        r.validate_tokens(tok)


def cmd_demo(args) -> int:
    from .editor import MOSEEditor
    from .eval.metrics import score_cases
    from .hf.scoring import greedy_answer
    from .requests import EditRequest
    mcfg, cfg = _model_checks(args)
    requests = [EditRequest(**r) for r in DEMO_REQUESTS]
    print(f"Using {_describe(cfg, getattr(mcfg, 'model_type', None))}", flush=True)
    model, tok = _load(args)
    editor = MOSEEditor(model, tok, cfg, data_dir=args.data_dir, statistics_file=args.stats)

    def show(title):
        scores = score_cases(model, tok, requests)
        print(f"\n=== {title} ===")
        for r, s in zip(requests, scores):
            verdict = "new answer preferred" if s.efficacy else "old answer preferred"
            print(f"  {r.text!r} → {greedy_answer(model, tok, r.text)!r}")
            print(f"      NLL {r.target_new!r} {s.rewrite_nll_new:.2f} vs "
                  f"{r.target_true!r} {s.rewrite_nll_true:.2f}: {verdict}")
            for p in r.paraphrase_prompts:
                print(f"    paraphrase {p!r} → {greedy_answer(model, tok, p)!r}")
            for p in r.neighborhood_prompts:
                print(f"    neighbour  {p!r} → {greedy_answer(model, tok, p)!r}  (should stay)")
    show("before editing")
    if not args.stats:
        from .memit.stats import default_cache_dir_for
        print(f"\nThe first run computes the model's key statistics once and caches them in "
              f"{default_cache_dir_for(cfg.stats_cache_dir)} ({FIRST_RUN_STATISTICS}); every later run reads them "
              "in under a second.", flush=True)
    print(f"\nEditing {len(requests)} facts in one batch ...", flush=True)
    t = time.perf_counter()
    rec = editor.edit(requests)
    print(f"  done in {time.perf_counter() - t:.0f} s (setup {rec.seconds_setup:.0f} s, "
          f"edit {rec.seconds_total:.1f} s); statistics corpus: {editor.statistics_corpus_name}")
    show("after editing")
    s = rec.seconds
    ratio = max(abs(l.weight_norm_after / l.weight_norm_before - 1) for l in rec.layers)
    print(f"\nSeconds: targets {s['targets']:.1f}, keys {s['keys']:.2f}, solve {s['solve']:.2f}, "
          f"apply {s['apply']:.2f}; "
          f"max ‖RᵀR − I‖_F {max(l.orth_error for l in rec.layers):.1e}; max |‖W‖_F after/before − 1| {ratio:.1e}")
    return 0


def cmd_edit(args) -> int:
    from .editor import MOSEEditor
    from .hf.models import as_dtype, check_savable, load_tokenizer, save_edits
    from .requests import load_requests
    requests = load_requests(args.requests, limit=args.limit)
    mcfg, cfg = _model_checks(args)
    save_dtype = as_dtype(args.save_dtype)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ValueError(f"--out {out} exists and is not an empty folder or a saved model")
    tok = load_tokenizer(args.model)
    _check_tokens(tok, requests)
    print(f"Using {_describe(cfg, getattr(mcfg, 'model_type', None))}", flush=True)
    model, tok = _load(args, tok)
    check_savable(model, out, save_dtype)
    editor = MOSEEditor(model, tok, cfg, data_dir=args.data_dir, statistics_file=args.stats)
    t = time.perf_counter()
    batch = args.batch_size or len(requests)
    for b in range(0, len(requests), batch):
        editor.edit(requests[b:b + batch])
    print(f"{len(requests)} edit(s) in batches of {batch}: {time.perf_counter() - t:.0f} s", flush=True)
    try:
        editor.save(out, dtype=save_dtype)
    except Exception as e:
        state = editor.weights_dict()
        journal = {"config": cfg.to_dict(), "model": args.model, "entries": editor.journal}
        rescue = out if out.is_dir() else Path(f"{out}.edits")
        try:
            save_edits(state, journal, rescue / "edits")
        except Exception:
            rescue = Path.cwd() / f"mose-edits-{int(time.time())}"
            save_edits(state, journal, rescue / "edits")
        print(f"mose-fast edit: error: saving the model failed ({e}); the edited matrices and the journal are in "
              f"{rescue / 'edits'}: `mose-fast apply --model {args.model} --edits {rescue / 'edits'} --out DIR` "
              "writes the edited model without editing again", file=sys.stderr)
        return 1
    print(f"edited model and journal written to {out}")
    return 0


def cmd_apply(args) -> int:
    """Write a model with saved edits applied (from ``edit``'s rescue folder), without editing again."""
    from safetensors.torch import load_file

    from .config import MOSEConfig
    from .editor import MOSEEditor
    from .hf.models import as_dtype, model_config
    edits = Path(args.edits)
    state_file, journal_file = edits / "edits.safetensors", edits / "mose_journal.json"
    for f in (state_file, journal_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --edits must be a folder written by `mose-fast edit`")
    journal = json.loads(journal_file.read_text())
    mcfg = model_config(args.model)
    cfg = MOSEConfig.from_dict({k: v for k, v in journal["config"].items()}, getattr(mcfg, "model_type", None),
                               where=str(journal_file))
    if getattr(mcfg, "num_hidden_layers", None) is not None:
        cfg.validate_for_model(mcfg.num_hidden_layers, f"{journal_file} (config.layers)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ValueError(f"--out {out} exists and is not an empty folder or a saved model")
    model, tok = _load(args)
    editor = MOSEEditor(model, tok, cfg, second_moments={}, data_dir=args.data_dir)
    editor.load_weights(load_file(str(state_file)))
    editor.journal = journal.get("entries", [])
    editor.save(args.out, dtype=as_dtype(args.save_dtype))
    print(f"model with the saved edits written to {args.out}")
    return 0


def cmd_stats(args) -> int:
    from .editor import MOSEEditor
    from .memit.stats import model_fingerprint
    from .memit.stats_file import save_statistics
    if args.stats:
        raise ValueError("--stats reads a statistics file; `mose-fast stats` writes one with --out FILE")
    _, cfg = _model_checks(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name (e.g. {out / 'stats.safetensors'})")
    model, tok = _load(args)
    editor = MOSEEditor(model, tok, cfg, data_dir=args.data_dir)
    t = time.perf_counter()
    c0 = editor.second_moments()
    seconds = time.perf_counter() - t
    n_tokens = max(editor.statistics_tokens.values(), default=cfg.stats_tokens)
    print(f"statistics corpus: {editor.statistics_corpus_name}; C0 over {n_tokens} tokens, {seconds:.0f} s "
          "(the corpus and C0 are cached: a second run reads them in well under a second)")
    for l in cfg.layers:
        c = c0[l]
        print(f"layer {l}: C0 {tuple(c.shape)}, trace {float(c.trace()):.4f}")
    if out is not None:
        save_statistics(out, {l: c0[l] for l in cfg.layers}, model.config, tok, editor.statistics_corpus_name,
                        n_tokens, model_fingerprint(model))
        print(f"statistics of layers {cfg.layers} written to {out}: use them with --stats {out}")
    return 0


def _eval_requests(args):
    """The evaluation's requests.  A named benchmark passes over records that are no edit (each one
    reported); a user's own file must be valid throughout."""
    from .memit.stats import default_data_dir
    from .requests import load_benchmark, load_requests
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.dataset not in ("counterfact", "zsre"):
        return data, load_requests(Path(args.dataset), limit=args.n_edits, offset=args.offset)
    path = (data / "counterfact" / f"counterfact-{args.split}.json" if args.dataset == "counterfact"
            else data / "zsre" / "zsre_mend_train-1k.json")
    requests, skipped = load_benchmark(path, limit=args.n_edits, offset=args.offset)
    for i, why in skipped:
        print(f"{path.name}: record #{i} passed over: {why}", flush=True)
    return data, requests


def _background_requests(args, requests: list) -> list:
    """The first ``--background-n`` cases of ``--background``, edited before the run's own (unscored)."""
    from .requests import load_benchmark
    if args.background is None:
        if args.background_n:
            raise ValueError("--background-n needs --background FILE")
        return []
    if not args.background_n or args.background_n < 1:
        raise ValueError("--background FILE needs --background-n N ≥ 1 (how many of its cases to edit first)")
    path = Path(args.background)
    background, skipped = load_benchmark(path, limit=args.background_n)
    for i, why in skipped:
        print(f"{path.name}: record #{i} passed over: {why}", flush=True)
    shared = sorted({r.case_id for r in background} & {r.case_id for r in requests}, key=str)
    if shared:
        raise ValueError(f"--background {path}: case ids {shared[:5]} are also among the run's own cases")
    return background


def cmd_eval(args) -> int:
    from .eval.runner import EvalSettings, control_cases, run_eval, run_identity, run_sequential
    from .eval.store import RunFolder
    from .hf.models import load_tokenizer
    data, requests = _eval_requests(args)
    background = _background_requests(args, requests)
    if background and args.before_after:
        raise ValueError("--background is for sequential runs (not --before-after)")
    requests = background + requests
    mcfg, cfg = _model_checks(args)
    settings = EvalSettings(eval_every=args.eval_every, batch_size=args.batch_size, glue_n=args.glue_n,
                            glue_tasks=tuple(t for t in args.glue_tasks.split(",") if t),
                            ppl_tokens=args.ppl_tokens, data_dir=str(data), checkpoint_every=args.checkpoint_every,
                            eval_at=args.eval_at, sample=args.sample, sample_seed=args.sample_seed,
                            background=len(background), control=args.control, control_n=args.control_n)
    if not args.before_after:
        settings.validate()
        control_cases(settings, [r.case_id for r in requests])
        # a different run in --out is reported now, not after loading the model
        RunFolder(args.out).check(run_identity(args.model, cfg, settings, requests), args.extend)
    tok = load_tokenizer(args.model)
    _check_tokens(tok, requests)
    print(f"Using {_describe(cfg, getattr(mcfg, 'model_type', None))}", flush=True)
    model, tok = _load(args, tok)
    if args.before_after:
        run_sequential(model, tok, requests, cfg, args.out, model_name=args.model, data_dir=data,
                       statistics_file=args.stats)
    else:
        run_eval(model, tok, requests, cfg, args.out, settings, model_name=args.model, extend=args.extend,
                 initial_eval_from=args.initial_eval_from, statistics_file=args.stats)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def cmd_report(args) -> int:
    from .eval.store import report_from_folder
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


PUBLISHED_CONFIGS = {"llama2-13b": "llama2_13b_config", "llama3-8b": "llama3_8b_config"}


def cmd_plan(args) -> int:
    """The memory plan of a job, from the model's config alone (nothing is loaded)."""
    from . import plan as planner
    if args.model in PUBLISHED_CONFIGS:
        config = getattr(planner, PUBLISHED_CONFIGS[args.model])()
    else:
        config = planner.load_config(args.model)
    cfg = build_config(args, getattr(config, "model_type", None))
    for name, v in (("--edits", args.edits), ("--batch", args.batch)):
        if v < (0 if name == "--edits" else 1):
            raise ValueError(f"{name} = {v}: must be ≥ {0 if name == '--edits' else 1}")
    result = planner.plan(args.model, cfg, edits=args.edits, batch=args.batch, dtype=args.dtype or "bfloat16",
                          device=args.device or "cuda", gpu_mem=args.gpu_mem, config=config)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.markdown())
    return 0 if result.fits() is not False else 1


def cmd_presets(args) -> int:
    from .config import presets
    width = max(len(k) for k in presets())
    for name, summary in presets().items():
        print(f"{name:<{width}}  {summary}")
    return 0


def _add_model(p, edits: bool = True):
    p.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or 'smollm2-135m' (default)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights' dtype (default float32)")
    p.add_argument("--device-map", dest="device_map",
                   help="accelerate's placement for a model larger than one device, e.g. 'auto'")
    p.add_argument("--data-dir", dest="data_dir",
                   help="folder with wikitext-2/, counterfact/, glue/ (default: $MOSE_DATA_DIR or ../shared/data)")
    if not edits:
        return
    p.add_argument("--preset", help="named configuration (`mose-fast presets`; default: mose)")
    p.add_argument("--config", help="JSON file: a preset plus MOSEConfig fields")
    p.add_argument("--layers", type=parse_layers, help="edited layers, e.g. 4-8")
    p.add_argument("--modules", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                   help="MOSE: what rotates at each edited layer, comma-separated: mlp.down (default), mlp.in, "
                        "attn.qk, attn.v")
    p.add_argument("--lam", type=float, help="retention weight λ (MOSE)")
    p.add_argument("--polar-method", dest="polar_method",
                   help="auto (default) | svd | eigh | newton_schulz[_fp32] | polar_express[_fp32] | cupy_gesvd[j] | "
                        "subspace | krylov | randomized")
    p.add_argument("--land-retries", dest="land_retries", type=int,
                   help="MOSE: re-solve an edit up to N times while a request misses P(new) > P(true)")
    p.add_argument("--land-boost", dest="land_boost", type=float,
                   help="MOSE: factor on a missed request's edit-term weight per retry")
    p.add_argument("--stats-tokens", dest="stats_tokens", type=int, help="corpus tokens for C0")
    p.add_argument("--stats-corpus", dest="stats_corpus",
                   help="text file for C0 (default: WikiText-2 in the data folder, else text the model writes)")
    p.add_argument("--seed", type=int)
    p.add_argument("--stats", help="C0 from a statistics file (`mose-fast stats --out FILE`), checked against the "
                                   "model and tokenizer before loading")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="mose-fast", description="Multiplicative orthogonal sequential editing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="edit the embedded SmolLM2 and show answers before/after")
    _add_model(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("edit", help="apply edits from a JSON file and save the edited model")
    _add_model(p)
    p.add_argument("--requests", required=True, help="JSON file (ROME, EasyEdit or MEND schema)")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1,
                   help="requests per edit (default 1: one after another; 0: all in one edit)")
    p.add_argument("--save-dtype", dest="save_dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the model's)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_edit)
    p = sub.add_parser("apply", help="write a model with the edits `edit` saved when it could not save the model")
    _add_model(p, edits=False)
    p.add_argument("--edits", required=True, help="the edits folder `mose-fast edit` named")
    p.add_argument("--save-dtype", dest="save_dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_apply)
    p = sub.add_parser("stats", help="precompute and cache the key statistics C0 (--out: also write a statistics file)")
    _add_model(p)
    p.add_argument("--out", help="write C0 of the edited layers to this file, for --stats FILE elsewhere")
    p.set_defaults(fn=cmd_stats)
    p = sub.add_parser("eval", help="sequential edits with periodic metrics; resumable")
    _add_model(p)
    p.add_argument("--dataset", default="counterfact", help="'counterfact', 'zsre' or a JSON file of requests")
    p.add_argument("--split", default="edit", choices=["val", "edit"], help="CounterFact file")
    p.add_argument("--n-edits", dest="n_edits", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    p.add_argument("--eval-every", dest="eval_every", type=int, default=100)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=1,
                   help="edits between saved states (evaluation points always save)")
    p.add_argument("--glue-tasks", dest="glue_tasks", default="sst2",
                   help="comma-separated: sst2,mrpc,cola,rte,mmlu ('' for none)")
    p.add_argument("--glue-n", dest="glue_n", type=_count_or_all, default=200,
                   help="items of each task ('all': every item; default 200)")
    p.add_argument("--eval-at", dest="eval_at", type=_edit_counts,
                   help="evaluate after these numbers of edits, e.g. 1000,2000,3000,5000,7500,10000 "
                        "(default: every --eval-every edits); the end of the run is always evaluated")
    p.add_argument("--sample", type=int,
                   help="score a uniform sample of this many edited cases at each evaluation (and the last batch "
                        "on its own); default: every edited case")
    p.add_argument("--sample-seed", dest="sample_seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--background", metavar="FILE",
                   help="edit the first --background-n cases of FILE before the run's own cases, unscored: scores "
                        "of a model that has already taken that many edits (--eval-at and the journal count them)")
    p.add_argument("--background-n", dest="background_n", type=int, default=0, metavar="N")
    p.add_argument("--control", metavar="FILE",
                   help="score the first --control-n cases of FILE, which the run never edits, at every evaluation: "
                        "the model's drift on facts nobody edited, beside the edited cases' scores")
    p.add_argument("--control-n", dest="control_n", type=int, default=0, metavar="N")
    p.add_argument("--ppl-tokens", dest="ppl_tokens", type=int, default=20000)
    p.add_argument("--before-after", dest="before_after", action="store_true",
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
    p.add_argument("--labels", help="';'-separated row labels (default: preset and its overrides)")
    p.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("plan", help="peak memory by stage of an editing job, from the model's config alone")
    p.add_argument("--model", default="smollm2-135m",
                   help="model directory, config.json, GGUF file, 'smollm2-135m', or a published config: "
                        + ", ".join(PUBLISHED_CONFIGS))
    p.add_argument("--preset", help="named configuration (default: mose)")
    p.add_argument("--config", help="JSON file: a preset plus MOSEConfig fields")
    p.add_argument("--layers", type=parse_layers, help="edited layers, e.g. 4-8")
    p.add_argument("--modules", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                   help="MOSE: what rotates at each edited layer (default mlp.down)")
    p.add_argument("--edits", type=int, default=1000, help="edits already made (the edit memory's size)")
    p.add_argument("--batch", type=int, default=1, help="requests per edit")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights' dtype (default bfloat16)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="where the job runs (default cuda)")
    p.add_argument("--gpu-mem", dest="gpu_mem", type=float, help="device memory in GiB: say whether the job fits")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("presets", help="list the named configurations")
    p.set_defaults(fn=cmd_presets)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"mose-fast {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

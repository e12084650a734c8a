"""Seconds of the target optimisation on the embedded SmolLM2 (`mose` preset, the first CounterFact
cases), with the blocks up to the edited layer replayed (the default) and computed every step, and
the Adam steps each request took.

    python research/targets_timing.py [--batches 1,10]
"""
import argparse
import time

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.hf.arch import resolve_arch
from mose_fast.memit import prefix_cache as P
from mose_fast.memit import targets as T
from mose_fast.memit.stats import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,10")
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches: comma-separated batch sizes, got {args.batches!r}")
    if min(batches) < 1:
        ap.error(f"--batches: sizes must be ≥ 1, got {args.batches!r}")
    path = default_data_dir() / "counterfact" / "counterfact-edit.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found (set MOSE_DATA_DIR)")
    model, tok = load_model()
    requests = load_requests(path, limit=max(batches))
    cfg = MOSEConfig.preset("mose", "llama")
    templates = MOSEEditor(model, tok, cfg, progress=False).context_templates()
    arch, layer = resolve_arch(model), max(cfg.layers)
    real_init = P.PrefixCache.__init__
    try:
        for mode in ("replay", "compute"):
            def init(self, *a, _mode=mode, **k):      # the replay verified, then kept or switched off
                real_init(self, *a, **k)
                if not self.replays:
                    raise SystemExit("the replay check failed on this model: nothing to compare")
                self.replays = _mode == "replay"
            P.PrefixCache.__init__ = init
            for b in batches:
                t = time.perf_counter()
                res = T.compute_targets(model, tok, arch, layer, requests[:b], templates, cfg)
                print(f"{mode:8s} batch {b:3d}: {time.perf_counter() - t:7.2f} s; "
                      f"Adam steps {[r.steps for r in res]}", flush=True)
    finally:
        P.PrefixCache.__init__ = real_init


if __name__ == "__main__":
    main()

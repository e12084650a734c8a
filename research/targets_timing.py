"""Seconds of the target optimisation on the embedded SmolLM2 (`mose` preset, the first CounterFact
cases), with the blocks up to the edited layer replayed (the default) and computed every step, and
the Adam steps each request took.

    python research/targets_timing.py [--batches 1,10]
"""
import argparse
import time

from mose_fast import MOSEConfig, MOSEEditor, load_model, load_requests
from mose_fast.hf.arch import resolve_arch
from mose_fast.memit import targets as T
from mose_fast.memit.stats import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,10")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    path = default_data_dir() / "counterfact" / "counterfact-edit.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found (set MOSE_DATA_DIR)")
    model, tok = load_model()
    requests = load_requests(path, limit=max(batches))
    cfg = MOSEConfig.preset("mose", "llama")
    templates = MOSEEditor(model, tok, cfg, progress=False).context_templates()
    arch, layer = resolve_arch(model), max(cfg.layers)
    real_init = T._PrefixCache.__init__
    for mode in ("replay", "compute"):
        def init(self, *a, _mode=mode, **k):
            real_init(self, *a, **k)
            assert self.replays, "the replay check failed on this model"
            self.replays = _mode == "replay"
        T._PrefixCache.__init__ = init
        for b in batches:
            t = time.perf_counter()
            res = T.compute_targets(model, tok, arch, layer, requests[:b], templates, cfg)
            print(f"{mode:8s} batch {b:3d}: {time.perf_counter() - t:7.2f} s; Adam steps {[r.steps for r in res]}",
                  flush=True)
    T._PrefixCache.__init__ = real_init


if __name__ == "__main__":
    main()

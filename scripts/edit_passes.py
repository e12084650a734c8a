"""Does re-solving after a partial edit help?  The first N cases of counterfact-edit.json edited
sequentially from the unedited SmolLM2, once per (config, passes), reporting the share of the
target residual each edit leaves unmet at the last edited layer (EditRecord.target_unmet) and how
many edits landed (P(new) > P(true) on the prompt right after the edit).

    python scripts/edit_passes.py configs/smollm2-mose-input-lam1000.json paper \
        --cases 5 --passes 1,2

A config path of "paper" means the paper's rule (MOSEConfig defaults for the model)."""
import argparse
import json
import statistics
from pathlib import Path

from mose_fast.config import MOSEConfig
from mose_fast.editor import MOSEEditor
from mose_fast.eval.metrics import landed
from mose_fast.models import load_model
from mose_fast.requests import load_requests
from mose_fast.stats import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="config JSON files, or 'paper'")
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--passes", default="1,2")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", help="folder with counterfact/ (default: ../shared/data)")
    args = ap.parse_args()
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    requests = load_requests(data / "counterfact" / "counterfact-edit.json", limit=args.cases)
    print(f"| config | passes | target unmet after each edit (mean, max) | landed | seconds per edit |\n|---|---|---|---|---|")
    for path in args.configs:
        overrides = {} if path == "paper" else json.loads(Path(path).read_text())
        for passes in (int(p) for p in args.passes.split(",")):
            model, tok = load_model(args.model)
            cfg = MOSEConfig.preset(model.config.model_type, **{**overrides, "edit_passes": passes})
            editor = MOSEEditor(model, tok, cfg, progress=False)
            unmet, hits, seconds = [], [], []
            for r in requests:
                rec = editor.edit([r])
                unmet += rec.target_unmet
                hits += landed(model, tok, [r])
                seconds.append(rec.seconds_total)
            print(f"| {Path(path).stem} | {passes} | {statistics.mean(unmet):.3f}, {max(unmet):.3f} | "
                  f"{sum(hits):.0f} of {len(hits)} | {statistics.median(seconds):.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Which general tasks in the data folder the unedited model does better than chance on: the tasks a
lifelong run should track (issue 35: SST-2, and any other task clearly above chance).

Every item of each task (`glue/*.json`), zero-shot label likelihood as in the evaluations
(`mose_fast.eval.general.task_accuracy`). "Chance" is the accuracy of always answering the most
frequent gold label; a task counts as above chance when the Wilson 95 % interval of its accuracy lies
above that rate.

    python research/general_tasks_unedited.py [--out research/results/general_tasks_unedited.json]
"""
import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

from mose_fast import load_model
from mose_fast.eval.general import TASKS, _label_of, load_task, task_accuracy
from mose_fast.memit.stats import default_data_dir


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion p over n trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    data = default_data_dir()
    model, tok = load_model()
    rows = []
    print("| task | items | accuracy | Wilson 95 % | majority-label rate | above chance |")
    print("|---|---|---|---|---|---|")
    for task in TASKS:
        t = time.perf_counter()
        gold = Counter(_label_of(x, task) for x in load_task(data, task))
        res = task_accuracy(model, tok, data, task, n=None)
        lo, hi = wilson(res["accuracy"], res["n"])
        chance = max(gold.values()) / res["n"]
        row = {"task": task, "n": res["n"], "accuracy": res["accuracy"], "wilson95": [lo, hi],
               "chance": chance, "above_chance": lo > chance,
               "predicted_labels": dict(Counter(res["predictions"])), "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"| {task} | {res['n']} | {res['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {chance:.3f} | "
              f"{'yes' if row['above_chance'] else 'no'} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": "smollm2-135m", "tasks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Which general tasks in the data folder the unedited model does better than chance on: the tasks a
lifelong run should track (issue 35: SST-2, and any other task clearly above chance).

Every item of each task (`glue/*.json`), zero-shot label likelihood as in the evaluations
(`mose_fast.eval.general.task_accuracy`). "Chance" is the accuracy of always answering the most
frequent gold label; a task counts as clearly above chance when the Wilson 99 % interval of its
accuracy lies above that rate (the 95 % interval is printed beside it).

    python research/general_tasks_unedited.py [--out research/results/general_tasks_unedited.json]
    python research/general_tasks_unedited.py --judge research/results/general_tasks_unedited.json
        (the table again from a file of rows, no model)
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


def judge(row: dict) -> dict:
    """The row with both intervals and the call, from its accuracy, item count and chance rate."""
    lo95, hi95 = wilson(row["accuracy"], row["n"])
    lo99, hi99 = wilson(row["accuracy"], row["n"], 2.576)
    return {**{k: v for k, v in row.items() if k != "above_chance"}, "wilson95": [lo95, hi95],
            "wilson99": [lo99, hi99], "clearly_above_chance": lo99 > row["chance"]}


def table(rows: list[dict]) -> str:
    lines = ["| task | items | accuracy | Wilson 95 % | Wilson 99 % | majority-label rate | clearly above chance |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        (a, b), (c, d) = r["wilson95"], r["wilson99"]
        lines.append(f"| {r['task']} | {r['n']} | {r['accuracy']:.3f} | [{a:.3f}, {b:.3f}] | [{c:.3f}, {d:.3f}] | "
                     f"{r['chance']:.3f} | {'yes' if r['clearly_above_chance'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--judge", default=None, help="a JSON file of rows: judge them again and print the table")
    args = ap.parse_args()
    if args.judge:
        doc = json.loads(Path(args.judge).read_text())
        doc["tasks"] = [judge(r) for r in doc["tasks"]]
        Path(args.judge).write_text(json.dumps(doc, indent=1) + "\n")
        print(table(doc["tasks"]))
        return
    data = default_data_dir()
    model, tok = load_model()
    rows = []
    for task in TASKS:
        t = time.perf_counter()
        gold = Counter(_label_of(x, task) for x in load_task(data, task))
        res = task_accuracy(model, tok, data, task, n=None)
        rows.append(judge({"task": task, "n": res["n"], "accuracy": res["accuracy"],
                           "chance": max(gold.values()) / res["n"],
                           "predicted_labels": dict(Counter(res["predictions"])),
                           "seconds": time.perf_counter() - t}))
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": "smollm2-135m", "tasks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The issue-4 side-by-side on SmolLM2: the same first N cases of counterfact-edit.json, batch 1,
# edited sequentially by every rule, evaluated every 100 edits, then one table and one figure.
#
#   scripts/side_by_side.sh N              every rule below, then runs/side-by-side/comparison.{md,png}
#   scripts/side_by_side.sh N RULE ...     just these rules (no table; e.g. one stream of several)
#   BATCH=10 scripts/side_by_side.sh N RULE ...   batch 10 (N/10 edits of 10 cases) into
#                                                runs/smollm2-RULE-cf-b10; the table: mose-fast compare
#
# RULE names configs/smollm2-RULE.json (its method: "mose" for mose-*, else RULE; layers 4-8 unless
# the file says otherwise) and the folder runs/smollm2-RULE-cf-seq.  Every run folder is resumable
# and extendable: running again with a larger N continues each run from its saved state
# (--extend), so the comparison grows across sessions (100 → 200 → 1000).  The paper's MOSE rule
# is runs/smollm2-mose-cf1000 (1000 edits, same cases and settings).  THREADS=1 runs two streams
# side by side on a 2-core machine (about 12 s per edit each).
set -euo pipefail
N=${1:?usage: scripts/side_by_side.sh N [RULE ...]}
shift
COMPARE=$([ $# -eq 0 ] && echo yes || echo no)
RULES=${*:-mose-memory100 mose-input memit alphaedit rect prune rome}
THREADS=${THREADS:-$(nproc)}
BATCH=${BATCH:-1}
cd "$(dirname "$0")/.."
FIRST=runs/smollm2-mose-memory100-cf-seq    # its pre-edit evaluation is reused by the others
for rule in $RULES; do
  config=configs/smollm2-$rule.json
  [ -f "$config" ] || { echo "no $config" >&2; exit 2; }
  case $rule in mose*) method=mose ;; *) method=$rule ;; esac
  out=runs/smollm2-$rule-cf-seq
  [ "$BATCH" != 1 ] && out=runs/smollm2-$rule-cf-b$BATCH
  extra=()
  [ -f "$out/run.json" ] && extra+=(--extend)
  [ ! -f "$out/evals.jsonl" ] && [ "$out" != "$FIRST" ] && [ -f "$FIRST/evals.jsonl" ] && \
    extra+=(--initial-eval-from "$FIRST")
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS mose-fast eval --model smollm2-135m --method "$method" \
    --config "$config" --dataset counterfact --split edit --n-edits "$N" --batch-size "$BATCH" \
    --eval-every 100 ${extra[@]+"${extra[@]}"} --out "$out"
done
if [ "$COMPARE" = yes ] && [ "$BATCH" = 1 ]; then
  mose-fast compare runs/smollm2-mose-cf1000 runs/smollm2-*-cf-seq --out runs/side-by-side
fi

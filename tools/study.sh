#!/usr/bin/env bash
# The fixed-compute study on the built-in synthetic data: does the best K/n split of a budget
# N stay put as N grows, and does the split predicted from two small budgets win at a large
# one? Every run gets the same compute (--steps), so budgets differ only in their data.
#
#     tools/study.sh [OUT=runs/study]    # resumable: run it again to finish an interrupted study
#
# 1. The pool: 600 classes x 500 images (32 px) + 3 downstream tasks of unseen classes.
# 2. Budgets N = 1,000, 4,000 and 16,000, K/n = 1/16, 1/4, 1, 2, 4, 8, 16, 2 seeds, 400 steps
#    of 128 images each, no warm-up (an epoch-based warm-up would differ with N): 42 runs.
# 3. The check: fit N = 1,000 and 4,000 only, predict the best split of N = 16,000 with the
#    free fit, the alpha = beta fit and the ratio rule, each fit on all points and on the points
#    within 4x of each budget's best K/n (--fit-near 4), and run each predicted split there.
# 4. The report and both predictions (from the small budgets; from all three) in OUT.
# Measured: 83 min for the 52 runs on 2 cores of an Intel Xeon with AVX-512 BF16 (bf16
# training), in two sittings of 70 and 13 min. A CPU without AVX-512 BF16 trains in fp32: on
# the same Xeon a run's pre-training took 2.4x as long with --amp off, so expect ~2 hours there.
# The wall time is written to OUT/study-time.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/study}
py=${PY:-.venv/bin/python}
start=$(date +%s)
"$py" tools/make_shards.py --out shards/study --classes 600 --per-class 500 --no-progress
run=(sweep --data shards/study/pretrain --suite shards/study/suite.toml --out "$out"
     --recipe synthetic --steps 400 --warmup-epochs 0 --seeds 2 --repeats 3)
"$py" -m dptrain "${run[@]}" --sizes 1000,4000,16000 --ratios 0.0625,0.25,1,2,4,8,16
for near in "" 4; do  # exit 1 means some fit was refused; the others stand
    "$py" -m dptrain predict "$out" --size 16000 --fit-sizes 1000,4000 --json \
        ${near:+--fit-near $near} > "$out/predict-16000-from-small${near:+-near$near}.json" || true
done
predicted=$("$py" - "$out"/predict-16000-from-small*.json <<'PY'
import json, sys
ks = set()
for path in sys.argv[1:]:
    e = json.load(open(path))["sets"]["average"]
    ks |= {e[m]["prediction"]["classes"] for m in ("free", "tied", "ratio_rule")
           if "prediction" in e.get(m, {})}
print(",".join(str(k) for k in sorted(ks)))
PY
)
"$py" -m dptrain "${run[@]}" --sizes 16000 --classes "$predicted"
"$py" -m dptrain report "$out"
for near in "" 4; do
    "$py" -m dptrain predict "$out" --size 16000 --fit-sizes 1000,4000 ${near:+--fit-near $near} \
        > "$out/predict-16000-from-small${near:+-near$near}.txt" || true
done
"$py" -m dptrain predict "$out" --size 64000 > "$out/predict-64000.txt" || true
echo "$(( ($(date +%s) - start) / 60 )) min on $(nproc) cores; predicted K at N=16,000: $predicted" \
    | tee "$out/study-time.txt"

#!/usr/bin/env bash
# GPU check (not part of CI; needs one CUDA GPU, about 8 minutes):
#   1. bit-identical reruns on CUDA (train + attribute twice, compare bytes),
#   2. CPU-vs-GPU agreement of MAGIC scores on a small float64 config (<= 1e-8 relative),
#   3. the CIFAR-10 small experiment end to end with timings (needs CIFAR-10 in data/cifar10
#      or a network to download it).
# Usage: scripts/gpu_check.sh   (from the repository root, after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
MAGIC=.venv/bin/magic
PY=.venv/bin/python
OUT=${OUT:-runs/gpu_check}
rm -rf "$OUT"
SMALL=(dataset=wine model.hidden=[16] train.epochs=3 train.batch_size=16 dtype=float64)

echo "== 1. bit-identical reruns on cuda"
for r in a b; do
  $MAGIC train "${SMALL[@]}" device=cuda out_dir="$OUT/rerun_$r" >/dev/null
  $MAGIC attribute --test-ids 0:8 "${SMALL[@]}" device=cuda out_dir="$OUT/rerun_$r" >/dev/null
done
for f in train/final.pt train/outputs_loss.npy attribute/magic/scores.npy; do
  cmp "$OUT/rerun_a/$f" "$OUT/rerun_b/$f" && echo "identical: $f"
done

echo "== 2. cpu vs gpu scores (float64)"
for d in cpu cuda; do
  $MAGIC train "${SMALL[@]}" device=$d out_dir="$OUT/dev_$d" >/dev/null
  $MAGIC attribute --test-ids 0:8 "${SMALL[@]}" device=$d out_dir="$OUT/dev_$d" >/dev/null
done
$PY - "$OUT" <<'PYEOF'
import sys, numpy as np
out = sys.argv[1]
a, b = (np.load(f"{out}/dev_{d}/attribute/magic/scores.npy") for d in ("cpu", "cuda"))
rel = np.abs(a - b).max() / np.abs(a).max()
print(f"max relative difference cpu vs cuda: {rel:.2e} ({'ok' if rel <= 1e-8 else 'FAIL'} at 1e-8)")
sys.exit(0 if rel <= 1e-8 else 1)
PYEOF

echo "== 3. cifar10_small end to end"
C=(experiment=cifar10_small device=cuda out_dir="$OUT/cifar10_small" ground_truth.drop_fractions=[0.01,0.05,0.1]
   ground_truth.num_subsets=50)
time $MAGIC train "${C[@]}"
time $MAGIC attribute --test-ids 0:20 "${C[@]}"
time $MAGIC retrain-ground-truth "${C[@]}"
$MAGIC score "${C[@]}"

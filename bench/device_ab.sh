#!/bin/bash
# One device call: this tree's kernels against the committed ones in .gpu/base (refresh it with
# `git archive HEAD aotc bench kernels | tar -x -C .gpu/base`; carry .gpu/base), same card:
# GPU tests, `bench.variants` new and old, each with its own plan (VARIANTS adds more
# NAME=-DFLAGS builds of this tree, MLA=1 the many-rows shapes), then `bench.bench_sdpa
# --no-mlx` with torch. Logs in $OUT.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# An editable install of aotc (its import hook wins over the working directory) would give the
# base tree this tree's plan: refuse rather than time a mismatched pair.
if ! (cd .gpu/base && python3 -c "import aotc, sys; sys.exit('.gpu/base' not in aotc.__file__)"); then
  echo "aotc resolves outside .gpu/base (editable install?): uninstall it first" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m bench.build_harness .gpu/sdpa 16 > "$OUT/build.log" 2>&1 || tail -30 "$OUT/build.log"
(python3 -m bench.variants build /tmp/v new= $VARIANTS > "$OUT/vbuild.log" 2>&1
 cd .gpu/base && python3 -m bench.variants build /tmp/vb old= >> "$OUT/vbuild.log" 2>&1) &
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sdpa_cuda.py 2>&1 | tail -25 | tee "$OUT/tests.log"
wait
tail -5 "$OUT/vbuild.log"
# Each tree times its kernels with its own plan (a plan may not fit the other's kernels).
python3 -m bench.variants run /tmp/v 2>&1 | tee "$OUT/variants.log"
(cd .gpu/base && python3 -m bench.variants run /tmp/vb) 2>&1 | tee -a "$OUT/variants.log"
if [ -n "$MLA" ]; then
  python3 -m bench.variants run /tmp/v --mla 2>&1 | tee "$OUT/variants_mla.log"
  (cd .gpu/base && python3 -m bench.variants run /tmp/vb --mla) 2>&1 | tee -a "$OUT/variants_mla.log"
fi
python3 -m bench.bench_sdpa --no-mlx 2>&1 | tail -16 | tee "$OUT/bench.log"
exit 0

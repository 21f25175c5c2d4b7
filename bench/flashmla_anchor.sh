#!/usr/bin/env bash
# Builds build/flashmla/fmla_bench (bench/flashmla_anchor.cu): deepseek-ai's FlashMLA sm90 dense
# bf16 MLA decode, the anchor of issue #6, timed beside aotc on the same GPU. FlashMLA and CUTLASS
# are not part of aotc; name their git repositories and the commits to build:
#
#   FLASHMLA_GIT=/path/to/FlashMLA CUTLASS_GIT=/path/to/cutlass bash bench/flashmla_anchor.sh
#
# FLASHMLA_REV defaults to 9241ae3 (measured in bench/NOTES.md round 37), CUTLASS_REV to the
# commit that FlashMLA's csrc/cutlass submodule pins there. nvcc 12.3+ (13.0 here); sm_90a only.
# The binary links the CUDA runtime statically: the GPU machine needs only the driver.
set -euo pipefail
: "${FLASHMLA_GIT:?the path of a FlashMLA git repository}"
: "${CUTLASS_GIT:?the path of a CUTLASS git repository}"
FLASHMLA_REV=${FLASHMLA_REV:-9241ae3}
CUTLASS_REV=${CUTLASS_REV:-147f5673d0c1c3dcf66f78d677fd647e4a020219}
NVCC=${NVCC:-nvcc}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/build/flashmla"

rm -rf "$OUT/src"
mkdir -p "$OUT/src/flashmla" "$OUT/src/cutlass" "$OUT/obj"
# Each folder's own tree: a partial clone may lack blobs elsewhere (CUTLASS's images).
for dir in include tools/util/include; do
  git -C "$CUTLASS_GIT" archive --prefix="$dir/" "$CUTLASS_REV:$dir" | tar x -C "$OUT/src/cutlass"
done
git -C "$FLASHMLA_GIT" archive --prefix=csrc/ "$FLASHMLA_REV:csrc" | tar x -C "$OUT/src/flashmla"

# FlashMLA's setup.py flags for its sm90 sources; FLASH_MLA_DISABLE_FP16 (its own switch) leaves
# out the fp16 instantiations.
FLAGS=(
  -O3 -std=c++20 -DNDEBUG -D_USE_MATH_DEFINES -Wno-deprecated-declarations
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__
  -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda
  --use_fast_math "--ptxas-options=--register-usage-level=10" -lineinfo -DFLASH_MLA_DISABLE_FP16
  -gencode arch=compute_90a,code=sm_90a
)
CSRC="$OUT/src/flashmla/csrc"
INC=(-I "$CSRC" -I "$CSRC/kerutils/include" -I "$CSRC/sm90" -I "$OUT/src/cutlass/include"
  -I "$OUT/src/cutlass/tools/util/include")
declare -A SRC=(
  [splitkv]="$CSRC/sm90/decode/dense/instantiations/bf16.cu"
  [combine]="$CSRC/smxx/decode/combine/combine.cu"
  [sched_meta]="$CSRC/smxx/decode/get_decoding_sched_meta/get_decoding_sched_meta.cu"
  [drive]="$REPO/bench/flashmla_anchor.cu"
)
pids=()
for name in splitkv combine sched_meta drive; do  # the split pass first: it takes ~2 minutes
  "$NVCC" "${FLAGS[@]}" "${INC[@]}" -c "${SRC[$name]}" -o "$OUT/obj/$name.o" &
  pids+=($!)
  while (($(jobs -rp | wc -l) >= ${JOBS:-2})); do sleep 1; done
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$NVCC" -gencode arch=compute_90a,code=sm_90a -cudart static "$OUT"/obj/{drive,splitkv,combine,sched_meta}.o \
  -Xcompiler -static-libstdc++,-static-libgcc -o "$OUT/fmla_bench"
echo "built $OUT/fmla_bench"

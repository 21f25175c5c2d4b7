#!/bin/bash
# ncu, on the GPU machine: aotc's kernels and torch's SDPA on the same decode shapes, side by side
# (DRAM read rate, instructions, L2 requests and sectors, stalls). Harness in .gpu/sdpa.
#   bash bench/ncu_compare.sh ["B HQ HKV N D V" ...]
# DURATIONS=1: every kernel of each run (torch's split and combine kernels included) at the GPU's
# own clocks, caches flushed between kernels: what each kernel of a call costs, side by side.
M=dram__bytes_read.sum.per_second,gpu__time_duration.sum,smsp__inst_executed.sum
M=$M,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active
M=$M,lts__t_requests_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct
M=$M,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct
M=$M,smsp__warp_issue_stalled_barrier_per_warp_active.pct,launch__grid_size,launch__registers_per_thread
AOTC_K=(-k regex:sdpa -c 2)
TORCH_K=(-k regex:"flash|fmha|attention|cudnn|sm90" -c 2)
FLAGS=()
if [ -n "$DURATIONS" ]; then
  M=gpu__time_duration.sum,dram__bytes_read.sum.per_second,launch__grid_size,launch__block_size
  AOTC_K=() TORCH_K=() FLAGS=(--clock-control none)
fi
SHAPES=("$@")
[ ${#SHAPES[@]} -eq 0 ] && SHAPES=("8 32 8 32768 128 128" "1 16 16 8192 80 80")
for shape in "${SHAPES[@]}"; do
  echo "== aotc $shape"
  ncu "${FLAGS[@]}" --metrics $M "${AOTC_K[@]}" python3 -m bench.profile_one $shape 2>&1 | grep -v "^==PROF=="
  echo "== torch $shape"
  ncu "${FLAGS[@]}" --metrics $M "${TORCH_K[@]}" \
    python3 -m bench.profile_one $shape --torch 2>&1 | grep -v "^==PROF=="
done

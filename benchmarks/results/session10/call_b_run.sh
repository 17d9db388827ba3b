#!/bin/bash
# .devcarry/ncu_drive.py below is benchmarks/results/session9/call_a_ncu_drive.py, unchanged
# session 10 call B: where the expand's time goes at 256 tokens over 256 adapters (ncu per-instruction stalls),
# and what the influence statistics cost (kernel level, on and off)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/b
pack() { (cd $OUT && tar czf b.tgz b); }
cd $R/.devcarry/snap
for infl in "--influence" ""; do
  echo "== kernels $infl"
  timeout 100 python3 benchmarks/kernels_lora.py $infl --variants default --cases 256:1,256:256 --shapes qkv down --json $OUT/b/k_infl${infl:+on}.json 2>&1 | grep -E "^ +(qkv|down)"
  timeout 100 python3 benchmarks/kernels_lora.py --silu $infl --variants fused --cases 256:1,256:256 --json $OUT/b/ksilu_infl${infl:+on}.json 2>&1 | grep -E "^ +gate"
done
pack
NCU=$(which ncu)
timeout 150 $NCU --clock-control none -k regex:"_lora_expand_kernel" --launch-skip 2 --launch-count 1 --section WarpStateStats --section SchedulerStats --section Occupancy --section SpeedOfLight --section LaunchStats python3 $R/.devcarry/ncu_drive.py 256 256 > $OUT/b/ncu_expand_sections.txt 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Stall|Warp Cycles Per Issued|Block Limit Reg|Grid Size" $OUT/b/ncu_expand_sections.txt | head -30
pack
timeout 200 $NCU --clock-control none -k regex:"_lora_expand_kernel" --launch-skip 2 --launch-count 1 --set full --import-source no --page source --print-source sass --csv python3 $R/.devcarry/ncu_drive.py 256 256 > $OUT/b/ncu_expand_sass.csv 2>&1
wc -c $OUT/b/ncu_expand_sass.csv; head -c 600 $OUT/b/ncu_expand_sass.csv
pack
rm -rf $OUT/b

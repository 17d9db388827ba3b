#!/bin/bash
# session 9 call G: ncu of the LoRA kernels at 256 tokens over 256 adapters (the 1000-adapter decode step), final code
export PYTHONPATH=.
mkdir -p $OUT/g
NCU=$(which ncu)
SECT="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters"
timeout 250 $NCU --clock-control none -k regex:"_lora|_silu" --launch-skip 14 --launch-count 7 $SECT python3 .devcarry/ncu_drive.py 256 256 > $OUT/g/ncu_256_256.txt 2>&1
grep -E "^\s+_|Duration|Registers Per|Achieved Occupancy|DRAM Throughput|L2 Hit|L1/TEX Hit|excessive|Warp Cycles Per Issued|SM Active" $OUT/g/ncu_256_256.txt | head -90
timeout 150 $NCU --clock-control none -k regex:"_lora_shrink" --launch-skip 2 --launch-count 1 --set full --import-source no --page source --print-source sass python3 .devcarry/ncu_drive.py 256 256 > $OUT/g/ncu_shrink_sass.txt 2>&1
ls -la $OUT/g; cd $OUT && tar czf g.tgz g && rm -rf g

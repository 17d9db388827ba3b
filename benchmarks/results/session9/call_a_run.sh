#!/bin/bash
# session 9 call A: ncu of the LoRA kernels of a decode step (256 tokens, one adapter) and a prefill step
export PYTHONPATH=.
mkdir -p $OUT/a
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECT="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
timeout 200 $NCU --clock-control none -k regex:"_lora|_silu" --launch-skip 14 --launch-count 7 $SECT python3 .devcarry/ncu_drive.py 256 1 > $OUT/a/ncu_256_1.txt 2>&1
tail -3 $OUT/a/ncu_256_1.txt
grep -E "^\s+_|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|DRAM Throughput|Warp Cycles Per Issued" $OUT/a/ncu_256_1.txt | head -120
timeout 120 $NCU --clock-control none -k regex:"_lora_expand_silu|_silu_mul_kernel" --launch-skip 4 --launch-count 2 $SECT --section SourceCounters python3 .devcarry/ncu_drive.py 4096 1 > $OUT/a/ncu_4096_1.txt 2>&1
grep -E "^\s+_|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Warp Cycles Per Issued" $OUT/a/ncu_4096_1.txt | head -40
timeout 120 $NCU --clock-control none -k regex:"_lora_expand_silu" --launch-skip 2 --launch-count 1 --section WarpStateStats --section SourceCounters python3 .devcarry/ncu_drive.py 256 1 > $OUT/a/ncu_256_silu_src.txt 2>&1
cd $OUT && tar czf a.tgz a && rm -rf a

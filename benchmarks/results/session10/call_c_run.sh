#!/bin/bash
# .devcarry/ncu_drive.py below is benchmarks/results/session9/call_a_ncu_drive.py, unchanged
# session 10 call C: the expand software-pipelined (snap) vs fitted grids (prev, = call A snap)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/c
pack() { (cd $OUT && tar czf c.tgz c); }
cd $R/.devcarry/snap
timeout 150 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_influence.py tests/kernels/test_lora_expand_silu.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/c/tests.log
echo "== snap variants"
timeout 200 python3 benchmarks/kernels_lora.py --influence --variants default --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/c/k_snap.json 2>&1 | tail -16
pack
timeout 100 $(which ncu) --clock-control none -k regex:"_lora_expand_kernel" --launch-skip 2 --launch-count 1 --section WarpStateStats --section Occupancy --section SpeedOfLight --section LaunchStats --section MemoryWorkloadAnalysis python3 $R/.devcarry/ncu_drive.py 256 256 > $OUT/c/ncu_expand_sections.txt 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Warp Cycles Per Issued|Block Limit Reg|Grid Size" $OUT/c/ncu_expand_sections.txt | head -12
pack
cd $R/.devcarry/prev
echo "== prev"
timeout 100 python3 benchmarks/kernels_lora.py --influence --variants default --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/c/k_prev.json 2>&1 | tail -11
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 120 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -6
  cp /tmp/e$i/gpu_engine.json $OUT/c/engine_${i}_$d.json; pack
done
rm -rf $OUT/c

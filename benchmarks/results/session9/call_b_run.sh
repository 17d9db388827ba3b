#!/bin/bash
# session 9 call B: vectorised y/B accesses in the LoRA expand kernels; base (0b33a5a) vs snap
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/b
pack() { (cd $OUT && tar czf b.tgz b); }
W=/tmp/work_b; mkdir -p $W
cd $R/.devcarry/snap
timeout 150 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_expand_silu.py tests/kernels/test_lora_influence.py -q --noconftest -p no:cacheprovider 2>&1 | tail -2 | tee $OUT/b/tests.log
for d in base snap; do
  cd $R/.devcarry/$d
  echo "== kernels $d"
  timeout 100 python3 benchmarks/kernels_lora.py --influence --variants default --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv gate_up down --json $OUT/b/k_$d.json 2>&1 | tail -14
  timeout 100 python3 benchmarks/kernels_lora.py --silu --influence --variants fused,tall_bn64,tall_w8 --cases 32:1,256:1,256:32,256:256,4096:1 --json $OUT/b/ksilu_$d.json 2>&1 | tail -7
done
NCU=$(which ncu)
cd $R/.devcarry/snap
timeout 100 $NCU --clock-control none -k regex:"_lora|_silu" --launch-skip 14 --launch-count 7 --section SpeedOfLight --section Occupancy --section LaunchStats python3 $R/.devcarry/ncu_drive.py 256 1 > $OUT/b/ncu_256_1.txt 2>&1
grep -E "^\s+_|Duration|Registers Per|Achieved Occupancy" $OUT/b/ncu_256_1.txt | head -40; pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in base snap snap base; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 200 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -3
  cp /tmp/e$i/gpu_engine.json $OUT/b/engine_${i}_$d.json; pack
done
rm -rf $OUT/b

#!/bin/bash
# session 9 call D: sub16 (snap) vs c35d5da (prev); expand, shrink stage and silu sweeps
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/d
pack() { (cd $OUT && tar czf d.tgz d); }
cd $R/.devcarry/snap
echo "== expand/shrink sweep"
timeout 200 python3 benchmarks/kernels_lora.py --influence --variants default,dec_w4,dec_w8,dec_bn64,dec_bn256,tall_bn128,tall_w8,exp_s1,exp_s2,shr_s1,shr_s2 --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/d/k_shrink.json 2>&1 | tail -11
echo "== silu sweep"
timeout 150 python3 benchmarks/kernels_lora.py --silu --influence --variants fused,sub32,sub64,sub16_tall_w8,s1,s2,bn64,bn256 --cases 32:1,256:1,256:32,256:256,4096:1,4096:4 --json $OUT/d/k_silu.json 2>&1 | tail -7
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 150 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -4
  cp /tmp/e$i/gpu_engine.json $OUT/d/engine_${i}_$d.json; pack
done
rm -rf $OUT/d

#!/bin/bash
# session 9 call C: silu tall tiles in row blocks (snap) vs c35d5da (prev); shrink and silu tuning sweeps
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/c
pack() { (cd $OUT && tar czf c.tgz c); }
cd $R/.devcarry/snap
timeout 100 python3 -m pytest tests/kernels/test_lora_expand_silu.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/c/tests.log
echo "== shrink sweep"
timeout 150 python3 benchmarks/kernels_lora.py --influence --variants default,shr_it128,shr_it132_g1,shr_it528,shr_g2,shr_g4,shr_w8,shr_w2 --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/c/k_shrink.json 2>&1 | tail -11
echo "== silu sweep"
timeout 150 python3 benchmarks/kernels_lora.py --silu --influence --variants fused,sub16,sub64,sub16_tall_bn64,sub32_tall_w8,sub16_tall_w2,w2,w8 --cases 32:1,256:1,256:32,256:256,4096:1,4096:4 --json $OUT/c/k_silu.json 2>&1 | tail -7
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 150 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -4
  cp /tmp/e$i/gpu_engine.json $OUT/c/engine_${i}_$d.json; pack
done
rm -rf $OUT/c

#!/bin/bash
# session 10 call G: both influence sums in one reduction (snap) vs 3458e17 (prev)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/g
pack() { (cd $OUT && tar czf g.tgz g); }
cd $R/.devcarry/snap
timeout 200 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_influence.py tests/kernels/test_lora_expand_silu.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/g/tests.log
for d in prev snap; do
  cd $R/.devcarry/$d
  echo "== kernels $d"
  timeout 100 python3 benchmarks/kernels_lora.py --influence --variants default --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/g/k_$d.json 2>&1 | grep -E "^ +(qkv|down)"
  timeout 100 python3 benchmarks/kernels_lora.py --silu --influence --variants fused --cases 32:1,256:1,256:32,256:256,4096:1 --json $OUT/g/ksilu_$d.json 2>&1 | grep -E "^ *gate"
  pack
done
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 120 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -6
  cp /tmp/e$i/gpu_engine.json $OUT/g/engine_${i}_$d.json; pack
done
rm -rf $OUT/g

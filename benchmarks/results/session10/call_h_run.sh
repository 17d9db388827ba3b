#!/bin/bash
# session 10 call H: the fused kernel's tile path back to two influence reductions (snap) vs call G's snap (prev)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/h
pack() { (cd $OUT && tar czf h.tgz h); }
cd $R/.devcarry/snap
timeout 100 python3 -m pytest tests/kernels/test_lora_expand_silu.py tests/kernels/test_lora_influence.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/h/tests.log
j=0
for d in prev snap prev snap; do
  j=$((j+1)); cd $R/.devcarry/$d
  echo "== silu $d"
  timeout 100 python3 benchmarks/kernels_lora.py --silu --influence --variants fused --cases 32:1,256:1,256:32,256:256,4096:1 --json $OUT/h/ksilu_${j}_$d.json 2>&1 | grep -E "^ *gate"
  pack
done
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 120 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform 2>&1 | grep -E "^(nolora|one_adapter|a1000)" | tail -4
  cp /tmp/e$i/gpu_engine.json $OUT/h/engine_${i}_$d.json; pack
done
rm -rf $OUT/h

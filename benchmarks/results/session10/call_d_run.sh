#!/bin/bash
# session 10 call D: the fused gate/up kernel capped at 96 registers (snap) vs fitted grids only (prev, = call A snap)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/d
pack() { (cd $OUT && tar czf d.tgz d); }
cd $R/.devcarry/snap
timeout 100 python3 -m pytest tests/kernels/test_lora_expand_silu.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/d/tests.log
echo "== silu register caps"
timeout 150 python3 benchmarks/kernels_lora.py --silu --influence --variants fused,mr_none,mr64,mr80,mr112 --json $OUT/d/ksilu.json 2>&1 | grep -vE "^resident" | tail -9
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 120 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -6
  cp /tmp/e$i/gpu_engine.json $OUT/d/engine_${i}_$d.json; pack
done
rm -rf $OUT/d

#!/bin/bash
# session 9 call L: the expand prefetches column-block fields, row path takes prefetched token ids (snap) vs 0f11800 (prev)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/l
pack() { (cd $OUT && tar czf l.tgz l); }
cd $R/.devcarry/snap
timeout 150 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_influence.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/l/tests.log
echo "== block_n sweep"
for d in prev snap; do cd $R/.devcarry/$d; echo "-- $d"; timeout 100 python3 benchmarks/kernels_lora.py --influence --variants default --cases 32:32,256:1,256:32,256:256 --shapes qkv down --json $OUT/l/k_$d.json 2>&1 | tail -8; done
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap prev snap; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 150 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_one_adapter,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -6
  cp /tmp/e$i/gpu_engine.json $OUT/l/engine_${i}_$d.json; pack
done
rm -rf $OUT/l

#!/bin/bash
# session 9 call H: the expand's row path for short tiles (snap) vs 816dbeb (prev)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/h
pack() { (cd $OUT && tar czf h.tgz h); }
cd $R/.devcarry/snap
timeout 150 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_influence.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/h/tests.log
echo "== expand row-path sweep"
timeout 200 python3 benchmarks/kernels_lora.py --influence --variants default,exp_rows0,exp_rows1,exp_rows2,exp_rows8 --cases 32:1,32:32,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/h/k_rows.json 2>&1 | tail -14
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 150 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -5
  cp /tmp/e$i/gpu_engine.json $OUT/h/engine_${i}_$d.json; pack
done
rm -rf $OUT/h

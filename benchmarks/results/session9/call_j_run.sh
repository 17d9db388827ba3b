#!/bin/bash
# session 9 call J: block_n 256 at decode for ranks <= 16 (snap) vs d554049 (prev)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/j
pack() { (cd $OUT && tar czf j.tgz j); }
cd $R/.devcarry/snap
timeout 150 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_influence.py tests/kernels/test_lora_expand_silu.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/j/tests.log
echo "== block_n sweep"
timeout 200 python3 benchmarks/kernels_lora.py --influence --variants default,dec_bn128_r16 --cases 32:1,32:32,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/j/k_rows.json 2>&1 | tail -14
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 150 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_one_adapter,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -6
  cp /tmp/e$i/gpu_engine.json $OUT/j/engine_${i}_$d.json; pack
done
rm -rf $OUT/j

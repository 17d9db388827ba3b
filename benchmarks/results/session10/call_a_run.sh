#!/bin/bash
# session 10 call A: fitted persistent grids + y loaded early in the expand's row path (snap) vs b43912b (prev)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/a
pack() { (cd $OUT && tar czf a.tgz a); }
cd $R/.devcarry/snap
timeout 150 python3 -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_influence.py tests/kernels/test_lora_expand_silu.py -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/a/tests.log
echo "== snap variants"
timeout 200 python3 benchmarks/kernels_lora.py --influence --variants default,nofit,emr96,emr128,smr96,emr96_smr96 --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/a/k_snap.json 2>&1 | tail -16
pack
timeout 120 python3 benchmarks/kernels_lora.py --silu --influence --variants fused,nofit,mr96,mr128,mr96_smr96 --cases 32:1,256:1,256:32,256:256,4096:1 --json $OUT/a/ksilu_snap.json 2>&1 | tail -10
pack
cd $R/.devcarry/prev
echo "== prev"
timeout 100 python3 benchmarks/kernels_lora.py --influence --variants default --cases 32:1,256:1,256:32,256:256,4096:1 --shapes qkv down --json $OUT/a/k_prev.json 2>&1 | tail -11
pack
COMMON="--cuda-graphs on --no-graph-warmup --skip-hf --skip-latency --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --configs b32_nolora > /dev/null 2>&1
i=0
for d in prev snap snap prev; do
  i=$((i+1)); cd $R/.devcarry/$d
  echo "== engine $i $d"
  timeout 120 python3 benchmarks/gpu_engine.py --out /tmp/e$i $COMMON --configs nolora,one_adapter,a1000_uniform,b32_32adapters 2>&1 | grep -E "^(nolora|one_adapter|a1000|b32)" | tail -6
  cp /tmp/e$i/gpu_engine.json $OUT/a/engine_${i}_$d.json; pack
done
rm -rf $OUT/a

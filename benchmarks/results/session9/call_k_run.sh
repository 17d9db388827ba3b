#!/bin/bash
# session 9 call K: final engine run (f72cc6d) with transformers + PEFT and the online run
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/k
cd $R/.devcarry/snap
timeout 150 python3 benchmarks/gpu_parity.py --json $OUT/k/parity.json > $OUT/k/parity.log 2>&1; grep -E "tokens" $OUT/k/parity.log | tail -8
COMMON="--cuda-graphs on --no-graph-warmup --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --skip-hf --skip-latency --configs b32_nolora > /dev/null 2>&1
python3 benchmarks/gpu_engine.py --out /tmp/f $COMMON --skip-latency --configs nolora,one_adapter,a1000_uniform,a1000_zipf,b32_nolora,b32_one_adapter,b32_32adapters,peft_workload --online 0.5 --online-configs a1000_uniform --online-seconds 25 > $OUT/k/final.log 2>&1
tail -30 $OUT/k/final.log
cp /tmp/f/gpu_engine.json $OUT/k/final.json
cd $OUT && tar czf k.tgz k && rm -rf k

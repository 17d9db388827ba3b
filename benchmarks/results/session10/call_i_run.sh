#!/bin/bash
# session 10 call I: final engine run (439ebd7) with transformers + PEFT and the online run
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/i
cd $R/.devcarry/snap
timeout 150 python3 benchmarks/gpu_parity.py --json $OUT/i/parity.json > $OUT/i/parity.log 2>&1; grep -E "tokens" $OUT/i/parity.log | tail -8
COMMON="--cuda-graphs on --no-graph-warmup --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --skip-hf --skip-latency --configs b32_nolora > /dev/null 2>&1
python3 benchmarks/gpu_engine.py --out /tmp/i $COMMON --skip-latency --configs nolora,one_adapter,a1000_uniform,a1000_zipf,b32_nolora,b32_one_adapter,b32_32adapters,peft_workload --online 0.5 --online-configs a1000_uniform --online-seconds 25 > $OUT/i/final.log 2>&1
tail -30 $OUT/i/final.log
cp /tmp/i/gpu_engine.json $OUT/i/final.json
cd $OUT && tar czf i.tgz i && rm -rf i

#!/bin/bash
# session 10 call F: final engine run (3458e17) with transformers + PEFT and the online run
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/f
cd $R/.devcarry/snap
COMMON="--cuda-graphs on --no-graph-warmup --gc-freeze"
python3 benchmarks/gpu_engine.py --out /tmp/w $COMMON --skip-hf --skip-latency --configs b32_nolora > /dev/null 2>&1
python3 benchmarks/gpu_engine.py --out /tmp/f $COMMON --skip-latency --configs nolora,one_adapter,a1000_uniform,a1000_zipf,b32_nolora,b32_one_adapter,b32_32adapters,peft_workload --online 0.5 --online-configs a1000_uniform --online-seconds 25 > $OUT/f/final.log 2>&1
tail -30 $OUT/f/final.log
cp /tmp/f/gpu_engine.json $OUT/f/final.json
cd $OUT && tar czf f.tgz f && rm -rf f

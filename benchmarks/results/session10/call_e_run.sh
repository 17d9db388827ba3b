#!/bin/bash
# session 10 call E: kernel tests and parity on the GPU (3458e17)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/e
cd $R/.devcarry/snap
timeout 240 python3 -m pytest tests/kernels -q --noconftest -p no:cacheprovider 2>&1 | tail -1 | tee $OUT/e/kernel_tests.log
timeout 150 python3 benchmarks/gpu_parity.py --json $OUT/e/parity.json > $OUT/e/parity.log 2>&1; grep -E "tokens" $OUT/e/parity.log | tail -8
cd $OUT && tar czf e.tgz e && rm -rf e

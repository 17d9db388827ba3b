#!/bin/bash
# session 9 call E: GPU kernel tests, CUDA parity, kernel tables base (0b33a5a) vs final (snap = 6399b8c)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/e
pack() { (cd $OUT && tar czf e.tgz e); }
cd $R/.devcarry/snap
timeout 240 python3 -m pytest tests/kernels -q --noconftest -p no:cacheprovider 2>&1 | tail -3 | tee $OUT/e/kernel_tests.log
pack
timeout 150 python3 benchmarks/gpu_parity.py --json $OUT/e/parity.json > $OUT/e/parity.log 2>&1; grep -E "tokens|staggered|async" $OUT/e/parity.log | tail -12
pack
for d in base snap; do
  cd $R/.devcarry/$d
  echo "== kernels $d"
  timeout 100 python3 benchmarks/kernels_lora.py --influence --variants default --json $OUT/e/k_$d.json 2>&1 | tail -16
  timeout 100 python3 benchmarks/kernels_lora.py --silu --influence --variants unfused,fused --json $OUT/e/ksilu_$d.json 2>&1 | tail -8
  pack
done
rm -rf $OUT/e

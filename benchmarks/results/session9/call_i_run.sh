#!/bin/bash
# session 9 call I: d554049 (snap): CUDA parity, all kernel tests, block_n with the expand's row path
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/i
pack() { (cd $OUT && tar czf i.tgz i); }
cd $R/.devcarry/snap
timeout 150 python3 benchmarks/gpu_parity.py --json $OUT/i/parity.json > $OUT/i/parity.log 2>&1; grep -E "tokens|staggered|async" $OUT/i/parity.log | tail -12
pack
timeout 240 python3 -m pytest tests/kernels -q --noconftest -p no:cacheprovider 2>&1 | tail -2 | tee $OUT/i/kernel_tests.log
pack
timeout 150 python3 benchmarks/kernels_lora.py --influence --variants default,dec_bn64,dec_bn256,dec_w4 --cases 32:32,256:1,256:32,256:256 --shapes qkv down --json $OUT/i/k_bn.json 2>&1 | tail -12
pack; rm -rf $OUT/i

#!/bin/bash
# session 10 call J: launch-setting sweeps at e7b595c (fitted grids, influence in one reduction)
R=$(pwd)
export PYTHONPATH=.
mkdir -p $OUT/j
pack() { (cd $OUT && tar czf j.tgz j); }
cd $R/.devcarry/snap
timeout 200 python3 benchmarks/kernels_lora.py --influence --variants default,dec_w4,dec_w1,dec_bn512_r16,dec_w4_bn512_r16,shr_w2,shr_w8,shr_it528 --cases 32:1,256:1,256:32,256:256 --shapes qkv down --json $OUT/j/k.json 2>&1 | grep -E "^ +(shape|qkv|down)"
pack
timeout 150 python3 benchmarks/kernels_lora.py --silu --influence --variants fused,w2,w8,bn64,bn256,tall_w8 --cases 32:1,256:1,256:32,256:256,4096:1 --json $OUT/j/ksilu.json 2>&1 | grep -E "^ *(shape|gate)"
pack
rm -rf $OUT/j

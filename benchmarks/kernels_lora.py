"""LoRA shrink+expand kernels alone: time vs the bytes floor, decode and prefill shapes, launch variants.

Llama-3-8B layer shapes (fused q/k/v 4096 -> 4096/1024/1024, gate/up 4096 -> 2 x 14336, down 14336 -> 4096),
rank 16 (and mixed ranks 1/7/16/64), tokens spread over n distinct adapters. Floor = (x read + distinct adapter bytes + y read and written) / copy bandwidth.

    python benchmarks/kernels_lora.py --json out.json

With --silu: the gate/up projection only, the engine's MLP path with adapters. "unfused" is shrink + expand +
elementwise silu_mul (what the engine ran before session 7); the other columns are shrink +
lora_expand_silu_mul_triton under TUNING variants. Floor = (x read + distinct adapter bytes + gate/up output read
+ activation written) / copy bandwidth.

    python benchmarks/kernels_lora.py --silu --influence --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import lora  # noqa: E402
from kernels.elementwise import silu_mul_triton  # noqa: E402
from kernels.lora import (  # noqa: E402
    lora_expand_silu_mul_triton,
    lora_expand_triton,
    lora_shrink_triton,
    make_lora_meta,
)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms / 1e3)


SHAPES = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}
CASES = [(32, 1, 16), (32, 32, 16), (256, 1, 16), (256, 32, 16), (256, 256, 16), (256, 256, "mixed"),
         (4096, 1, 16), (4096, 4, 16), (4096, 0, 16)]
VARIANTS = {  # lora.TUNING settings swept (the first is the current default)
    "default": {},
    "g4": dict(shrink_grid=4, expand_grid=4),
    "g16": dict(shrink_grid=16, expand_grid=16),
    "bn256": dict(block_n=256, block_n_r16=None),
    "bn64_it528": dict(shrink_items=528, block_n=64, block_n_r16=None),
    # the expand's settings for tall (prefill) tiles and its warps at decode
    "tall_bn256": dict(block_n_tall=256),
    "tall_bn64": dict(block_n_tall=64),
    "tall_bn128": dict(block_n_tall=128),
    "tall_w8": dict(expand_warps_tall=8),
    "tall_bn256_w8": dict(block_n_tall=256, expand_warps_tall=8),
    "dec_w4": dict(expand_warps=4),
    "dec_w8": dict(expand_warps=8),
    "dec_w1": dict(expand_warps=1),
    "dec_bn64": dict(block_n=64, block_n_r16=None),
    "dec_bn256": dict(block_n=256, block_n_r16=None),
    "dec_bn128_r16": dict(block_n_r16=None),  # ranks <= 16 at decode take block_n (128), as before session 9
    "dec_bn512_r16": dict(block_n_r16=512),
    "dec_w4_bn512_r16": dict(block_n_r16=512, expand_warps=4),
    "tall_bn32": dict(block_n_tall=32),
    "tall_w2": dict(expand_warps_tall=2),
    "shr_w2": dict(shrink_warps=2),
    "shr_w8": dict(shrink_warps=8),
    # the shrink's work split at decode: fewer, longer K ranges per item, fewer programs
    "shr_it128": dict(shrink_items=128),
    "shr_it132_g1": dict(shrink_items=132, shrink_grid=1),
    "shr_it528": dict(shrink_items=528),
    "shr_g2": dict(shrink_grid=2),
    "shr_g4": dict(shrink_grid=4),
    # persistent grids: fit to the programs resident at once (the default) or not; register caps for occupancy
    "nofit": dict(fit_grid=False),
    "eg6": dict(expand_grid=6),
    "eg12": dict(expand_grid=12),
    "emr96": dict(expand_maxnreg=96),
    "emr128": dict(expand_maxnreg=128),
    "smr96": dict(shrink_maxnreg=96),
    "smr64": dict(shrink_maxnreg=64),
    "emr96_smr96": dict(expand_maxnreg=96, shrink_maxnreg=96),
    # the expand's row path: tiles of at most expand_short_rows tokens go row by row (0: every tile a dot)
    "exp_rows0": dict(expand_short_rows=0),
    "exp_rows1": dict(expand_short_rows=1),
    "exp_rows2": dict(expand_short_rows=2),
    "exp_rows8": dict(expand_short_rows=8),
}


# --silu: the fused gate/up expand + activation; "unfused" is not a TUNING setting but the old three-kernel path
SILU_CASES = [(32, 1, 16), (32, 32, 16), (256, 1, 16), (256, 32, 16), (256, 256, 16), (4096, 1, 16), (4096, 4, 16)]
SILU_VARIANTS = {
    "unfused": None,
    "fused": {},
    "tiles": dict(silu_short_rows=0),
    "rows4": dict(silu_short_rows=4),
    "rows16": dict(silu_short_rows=16),
    "w2": dict(silu_warps=2),
    "w8": dict(silu_warps=8),
    "bn64": dict(silu_block_n=64),
    "bn256": dict(silu_block_n=256),
    "tall_bn128": dict(silu_block_n_tall=128),
    "tall_w8": dict(silu_warps_tall=8),
    # tall (prefill) tiles done silu_sub_rows rows at a time (64: the whole tile, as before session 9)
    "sub16": dict(silu_sub_rows=16),
    "sub32": dict(silu_sub_rows=32),
    "sub64": dict(silu_sub_rows=64),
    "sub16_tall_bn64": dict(silu_sub_rows=16, silu_block_n_tall=64),
    "sub32_tall_w8": dict(silu_sub_rows=32, silu_warps_tall=8),
    "sub16_tall_w2": dict(silu_sub_rows=16, silu_warps_tall=2),
    "sub16_tall_w8": dict(silu_sub_rows=16, silu_warps_tall=8),
    "nofit": dict(fit_grid=False),
    "mr_none": dict(silu_maxnreg=None),
    "mr64": dict(silu_maxnreg=64),
    "mr80": dict(silu_maxnreg=80),
    "mr96": dict(silu_maxnreg=96),
    "mr112": dict(silu_maxnreg=112),
    "mr128": dict(silu_maxnreg=128),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="kernels_lora.json")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--variants", default="", help="comma-separated subset of VARIANTS (default: all)")
    ap.add_argument("--cases", default="", help="comma-separated T:adapters subset of CASES (default: all)")
    ap.add_argument("--influence", action="store_true",
                    help="the expand also sums the per-token influence statistics (as the engine runs it)")
    ap.add_argument("--silu", action="store_true", help="gate/up only: the fused expand + activation (see above)")
    args = ap.parse_args()
    table = SILU_VARIANTS if args.silu else VARIANTS
    variants = {k: v for k, v in table.items() if not args.variants or k in args.variants.split(",")}
    if args.silu:
        args.shapes = ["gate_up"]
    bw = copy_bandwidth()
    slots_n = 256
    base_tuning = dict(lora.TUNING)
    rows = []
    for shape in args.shapes:
        hidden, outs = SHAPES[shape]
        for T, n_ad, rank_kind in (SILU_CASES if args.silu else CASES):
            if args.cases and f"{T}:{n_ad}" not in args.cases.split(","):
                continue
            if shape != "qkv" and (rank_kind == "mixed" or T == 4096) and not args.cases and not args.silu:
                continue
            max_rank = 64 if rank_kind == "mixed" else 16
            ranks = (torch.tensor([1, 7, 16, 64] * (slots_n // 4)) if rank_kind == "mixed"
                     else torch.full((slots_n,), 16)).int().cuda()
            a = [torch.randn(slots_n, max_rank, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in outs]
            b = [torch.randn(slots_n, o, max_rank, device="cuda", dtype=torch.bfloat16) * 0.02 for o in outs]
            scale = torch.ones(slots_n, device="cuda")
            x = torch.randn(T, hidden, device="cuda", dtype=torch.bfloat16)
            y = torch.randn(T, sum(outs), device="cuda", dtype=torch.bfloat16)
            slots = ((torch.arange(T, device="cuda") % n_ad).int() if n_ad
                     else torch.full((T,), -1, device="cuda").int())
            meta = make_lora_meta(slots, num_slots=slots_n)
            used = sorted(set(slots.tolist()) - {-1})
            r_used = ranks[used].float().sum().item() if used else 0.0
            ad_bytes = r_used * (hidden * len(outs) + sum(outs)) * 2
            # the expand reads and writes y; the fused kernel reads it and writes an activation half its width
            floor_bytes = x.numel() * 2 + ad_bytes + (y.numel() * 3 // 2 if args.silu else 2 * y.numel()) * 2
            row = dict(shape=shape, T=T, adapters=n_ad, rank=str(rank_kind), floor_us=floor_bytes / bw * 1e6)
            for vname, tune in variants.items():
                lora.TUNING.clear()
                lora.TUNING.update(base_tuning, **(tune or {}))

                sums = torch.zeros(2, T, device="cuda") if args.influence else None

                def run(unfused=args.silu and tune is None):
                    h = lora_shrink_triton(x, a, ranks, meta)
                    if args.silu and not unfused:
                        lora_expand_silu_mul_triton(y, h, b, ranks, scale, meta, influence=sums)
                        return
                    lora_expand_triton(y, h, b, ranks, scale, meta, influence=sums)
                    if unfused:
                        silu_mul_triton(y)

                # graph replay removes launch gaps, as in the engine's decode graphs
                run()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                ms = triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")
                row[vname] = ms * 1e3
            rows.append(row)
            del a, b
    lora.TUNING.clear()
    lora.TUNING.update(base_tuning)
    # programs an SM holds of each launch (what fit_grid sizes the grids to)
    resident = [dict(kernel=k[0], dtype=str(k[1]), consts=dict(k[2]), warps=k[3], maxnreg=k[4], per_sm=v)
                for k, v in lora._RESIDENT.items()]
    res = dict(device=torch.cuda.get_device_name(), copy_bw_tb_s=bw / 1e12, variants=variants, rows=rows,
               influence=args.influence, silu=args.silu, resident=resident)
    Path(args.json).write_text(json.dumps(res, indent=1))
    what = "gate/up shrink + expand + activation" if args.silu else "LoRA shrink+expand"
    print(f"{what} us (graph replay), copy bw {bw / 1e12:.2f} TB/s; variants {variants}")
    print(f"{'shape':>7} {'T':>5} {'adapt':>5} {'rank':>5} {'floor':>7} " + " ".join(f"{v:>10}" for v in variants))
    for r in rows:
        print(f"{r['shape']:>7} {r['T']:>5} {r['adapters']:>5} {r['rank']:>5} {r['floor_us']:>7.1f} "
              + " ".join(f"{r[v]:>10.1f}" for v in variants))
    for r in resident:
        print(f"resident {r['kernel']:>6} warps {r['warps']} maxnreg {r['maxnreg']}: {r['per_sm']} an SM "
              f"(BLOCK_M {r['consts'].get('BLOCK_M')}, BLOCK_N {r['consts'].get('BLOCK_N')})")


if __name__ == "__main__":
    main()

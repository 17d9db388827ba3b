"""Paged attention: Triton kernel vs torch SDPA on contiguous tensors, and the KV-bytes floor.

Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128), 16-token blocks.

    python benchmarks/kernels_attention.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.attention import paged_attention_triton  # noqa: E402

H, HKV, D, BS = 32, 8, 128, 16
VARIANTS = {  # keyword arguments of paged_attention_triton swept (the first is the default)
    "default": {},
    "bn32": dict(block_n=32),
    "split4": dict(num_splits=4),
    "bq32_w8": dict(block_q=32, num_warps=8),
    "bn128_w8": dict(block_n=128, num_warps=8),
}


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms / 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="kernels_attention.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    for name, B, q_len, ctx in [("decode", 32, 1, 512), ("decode", 256, 1, 512), ("decode", 32, 1, 4096),
                                ("decode", 4, 1, 8192), ("prefill", 4, 1024, 1024), ("chunk", 4, 512, 2048)]:
        nblk = -(-ctx // BS)
        bt = torch.randperm(B * nblk, device="cuda").int().view(B, nblk)
        kc = torch.randn(B * nblk, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(B * q_len, H, D, device="cuda", dtype=torch.bfloat16)
        sl = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        qsl = torch.arange(0, B * q_len + 1, q_len, device="cuda", dtype=torch.int32)
        kv_bytes = 2 * B * ctx * HKV * D * 2 + 2 * q.numel() * 2
        res = dict(kind=name, B=B, q_len=q_len, ctx=ctx, floor_us=kv_bytes / bw * 1e6)
        for vname, kw in VARIANTS.items():
            if "num_splits" in kw and q_len != 1:
                res[vname] = float("nan")
                continue
            ms = triton.testing.do_bench(
                lambda: paged_attention_triton(q, kc, vc, bt, sl, qsl, D**-0.5, max_query_len=q_len, **kw),
                warmup=25, rep=200, return_mode="median")
            res[vname] = ms * 1e3
        # SDPA baseline on already-contiguous K/V (no paging, so no gather cost)
        kk = kc[bt.long()].view(B, nblk * BS, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
        vv = vc[bt.long()].view(B, nblk * BS, HKV, D)[:, :ctx].transpose(1, 2).contiguous()
        qq = q.view(B, q_len, H, D).transpose(1, 2)
        kk, vv = kk.repeat_interleave(H // HKV, 1), vv.repeat_interleave(H // HKV, 1)
        mask = None
        if q_len > 1:
            pos = ctx - q_len + torch.arange(q_len, device="cuda")
            mask = torch.arange(ctx, device="cuda")[None, :] <= pos[:, None]
        ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=D**-0.5),
                                     warmup=25, rep=200, return_mode="median")
        res["sdpa_contig_us"] = ms * 1e3
        rows.append(res)
        del kc, vc, kk, vv
    out = dict(device=torch.cuda.get_device_name(), copy_bw_tb_s=bw / 1e12, variants=VARIANTS, rows=rows)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"paged attention (bf16, H={H}, Hkv={HKV}, D={D}, block {BS}), copy bw {bw / 1e12:.2f} TB/s")
    cols = list(VARIANTS) + ["sdpa_contig_us"]
    print(f"{'kind':>8} {'B':>4} {'q_len':>6} {'ctx':>6} {'floor us':>9} " + " ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(f"{r['kind']:>8} {r['B']:>4} {r['q_len']:>6} {r['ctx']:>6} {r['floor_us']:>9.1f} "
              + " ".join(f"{r[c]:>14.1f}" for c in cols))


if __name__ == "__main__":
    main()

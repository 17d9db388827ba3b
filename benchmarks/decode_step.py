"""Decode step of a Llama-3-8B-shaped model with multi-LoRA, timed as a CUDA graph against its roofline floor.

Random bf16 weights are made on the GPU (hidden 4096, 32 layers, 32 heads / 8 KV heads, head_dim 128,
intermediate 14336, vocab 128256). Every sequence has `--ctx` tokens of context (this step's token
included) in a paged KV cache of 16-token blocks. LoRA: rank-16 adapters on all 7 projections from a pool of
256 slots; q/k/v and gate/up go through one fused shrink/expand each.

For each (batch, distinct adapters) the step is captured once in a CUDA graph and replayed; the floor is
(base weight bytes + distinct adapter bytes + KV bytes read) / copy bandwidth measured in the same run.
Before timing, the graph is re-checked against an eager run after swapping in a different adapter mix and
ranks (the captured graph must stay valid for any mix).

    python benchmarks/decode_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import dispatch  # noqa: E402
from kernels import lora  # noqa: E402
from kernels.lora import make_lora_meta  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 4096, 32, 32, 8, 128, 14336, 128256
BLOCK = 16
RANK = 16
NUM_SLOTS = 256
# (name, in, out) of the 7 LoRA targets; q/k/v share a shrink, gate/up share one
MODULES = [
    ("q", HIDDEN, HEADS * HEAD_DIM), ("k", HIDDEN, KV_HEADS * HEAD_DIM), ("v", HIDDEN, KV_HEADS * HEAD_DIM),
    ("o", HEADS * HEAD_DIM, HIDDEN), ("gate", HIDDEN, INTER), ("up", HIDDEN, INTER), ("down", INTER, HIDDEN),
]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(ts)


def rand(*shape, std=0.02):
    return torch.empty(*shape, dtype=torch.bfloat16, device="cuda").normal_(0, std)


class Model:
    def __init__(self, max_seqs: int, ctx: int):
        self.w = []
        for _ in range(LAYERS):
            self.w.append(dict(
                ln1=torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda"),
                ln2=torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda"),
                qkv=rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                o=rand(HIDDEN, HEADS * HEAD_DIM),
                gate_up=rand(2 * INTER, HIDDEN),
                down=rand(HIDDEN, INTER),
            ))
        self.emb = rand(VOCAB, HIDDEN)
        self.lm_head = rand(VOCAB, HIDDEN)
        self.norm = torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda")
        self.base_bytes = sum(t.numel() * 2 for w in self.w for k, t in w.items() if k not in ("ln1", "ln2"))
        self.base_bytes += self.lm_head.numel() * 2
        # LoRA pool: per layer and module, A [slots, r, in] and B [slots, out, r]
        self.a = [{n: rand(NUM_SLOTS, RANK, i, std=1 / math.sqrt(i)) for n, i, _ in MODULES} for _ in range(LAYERS)]
        self.b = [{n: rand(NUM_SLOTS, o, RANK, std=0.01) for n, _, o in MODULES} for _ in range(LAYERS)]
        self.adapter_bytes = LAYERS * sum(RANK * (i + o) * 2 for _, i, o in MODULES)
        self.rank = torch.full((NUM_SLOTS,), RANK, dtype=torch.int32, device="cuda")
        self.scale = torch.full((NUM_SLOTS,), 2.0, dtype=torch.float32, device="cuda")
        # KV cache
        blocks_per_seq = -(-ctx // BLOCK)
        nb = max_seqs * blocks_per_seq + 1
        self.kc = [torch.empty(nb, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda").normal_()
                   for _ in range(LAYERS)]
        self.vc = [torch.empty_like(k).normal_() for k in self.kc]
        self.blocks_per_seq = blocks_per_seq
        inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
        self.inv_freq = inv

    def kv_bytes(self, batch: int, ctx: int) -> int:
        return LAYERS * 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2

    def rope(self, x, pos):  # x [T, H, D]
        f = pos.float()[:, None] * self.inv_freq[None, :]
        cos, sin = f.cos()[:, None, :].to(x.dtype), f.sin()[:, None, :].to(x.dtype)
        x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def lora(self, y, x, layer, names, st):
        if st["meta"] is None:
            return
        a = [self.a[layer][n] for n in names]
        b = [self.b[layer][n] for n in names]
        h = dispatch.lora_shrink(x, a, self.rank, st["meta"])
        dispatch.lora_expand(y, h, b, self.rank, self.scale, st["meta"])

    def step(self, st):
        T = st["ids"].shape[0]
        x = self.emb[st["ids"]]
        for li, w in enumerate(self.w):
            r = F.rms_norm(x, (HIDDEN,), w["ln1"], 1e-5)
            qkv = F.linear(r, w["qkv"])
            self.lora(qkv, r, li, ["q", "k", "v"], st)
            q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=1)
            q = self.rope(q.view(T, HEADS, HEAD_DIM), st["pos"])
            k = self.rope(k.view(T, KV_HEADS, HEAD_DIM), st["pos"])
            dispatch.write_kv(k, v.reshape(T, KV_HEADS, HEAD_DIM), self.kc[li], self.vc[li], st["slot_mapping"])
            o = dispatch.paged_attention(q, self.kc[li], self.vc[li], st["bt"], st["seq_lens"], st["qsl"],
                                         HEAD_DIM**-0.5).view(T, HEADS * HEAD_DIM)
            out = F.linear(o, w["o"])
            self.lora(out, o, li, ["o"], st)
            x = x + out
            r = F.rms_norm(x, (HIDDEN,), w["ln2"], 1e-5)
            gu = F.linear(r, w["gate_up"])
            self.lora(gu, r, li, ["gate", "up"], st)
            g, u = gu.split([INTER, INTER], dim=1)
            a = F.silu(g) * u
            d = F.linear(a, w["down"])
            self.lora(d, a, li, ["down"], st)
            x = x + d
        return F.linear(F.rms_norm(x, (HIDDEN,), self.norm, 1e-5), self.lm_head)


def make_state(model, batch, ctx, slots):
    dev = "cuda"
    seq = torch.arange(batch, device=dev)
    bt = (seq[:, None] * model.blocks_per_seq + torch.arange(model.blocks_per_seq, device=dev)[None, :]).int()
    pos = torch.full((batch,), ctx - 1, device=dev)
    return dict(
        ids=torch.randint(0, VOCAB, (batch,), device=dev),
        pos=pos,
        slot_mapping=(bt[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK),
        bt=bt,
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        qsl=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        meta=None if slots is None else make_lora_meta(slots, num_slots=NUM_SLOTS),
    )


def refresh_meta(st, slots):
    st["meta"].copy_(make_lora_meta(slots, num_slots=NUM_SLOTS))


def profile_step(model, st):
    """GPU time per kernel name over one eager step: [(name, total us, calls)], largest first."""
    from torch.profiler import ProfilerActivity, profile

    model.step(st)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.step(st)
        torch.cuda.synchronize()
    agg = {}
    evs = [ev for ev in prof.key_averages() if getattr(ev, "device_time_total", 0) > 0]
    kernels = [ev for ev in evs if str(getattr(ev, "device_type", "")).endswith("CUDA")]
    for ev in kernels or evs:
        agg[ev.key] = (ev.device_time_total, ev.count)
    return sorted(((k, t, n) for k, (t, n) in agg.items()), key=lambda r: -r[1])


def time_graph(g, reps):
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), min(ts), max(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default="decode_step.json")
    ap.add_argument("--lora-tuning", default="", help="kernels.lora.TUNING overrides, e.g. shrink_programs=16384")
    ap.add_argument("--configs", default="32:0,32:1,32:32,256:0,256:1,256:32,256:256", help="batch:adapters,...")
    ap.add_argument("--profile", default="", help="batch:adapters of one config to break down by kernel (eager)")
    args = ap.parse_args()
    for kv in filter(None, args.lora_tuning.split(",")):
        k, v = kv.split("=")
        lora.TUNING[k] = int(v)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    model = Model(256, args.ctx)
    torch.cuda.synchronize()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    rows = []
    for batch, n_ad in configs:
        slots = None if n_ad == 0 else (torch.arange(batch, device="cuda") % n_ad).int()
        st = make_state(model, batch, args.ctx, slots)
        # warm-up on a side stream (compiles kernels, fills launch tables), then capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model.step(st)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model.step(st)
        check = None
        if n_ad:
            # graph validity for another mix: different slots, some -1, and other ranks
            gen = torch.Generator(device="cuda").manual_seed(batch + n_ad)
            refresh_meta(st, torch.randint(-1, NUM_SLOTS, (batch,), device="cuda", generator=gen).int())
            model.rank[: NUM_SLOTS // 2] = 7
            g.replay()
            eager = model.step(st)
            check = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
            model.rank.fill_(RANK)
            refresh_meta(st, slots)
        med, lo, hi = time_graph(g, args.reps)
        floor_bytes = model.base_bytes + n_ad * model.adapter_bytes + model.kv_bytes(batch, args.ctx)
        floor_ms = floor_bytes / bw * 1e3
        rows.append(dict(batch=batch, adapters=n_ad, rank=RANK, ctx=args.ctx, step_ms=med, min_ms=lo, max_ms=hi,
                         floor_ms=floor_ms, floor_gb=floor_bytes / 1e9, frac_of_floor=floor_ms / med,
                         graph_vs_eager_rel_err=check))
        if args.profile == f"{batch}:{n_ad}":
            try:
                rows[-1]["profile"] = profile_step(model, st)
            except Exception as e:  # the profiler is a diagnostic; never lose the timings to it
                print(f"profile failed: {e!r}")
        del g, out
        torch.cuda.empty_cache()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=commit,
               lora_tuning=dict(lora.TUNING),
               copy_bw_tb_s=bw / 1e12, base_gb=model.base_bytes / 1e9, adapter_mb=model.adapter_bytes / 1e6,
               rows=rows)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"device {res['device']}  copy bw {bw / 1e12:.2f} TB/s  base weights {res['base_gb']:.2f} GB  "
          f"adapter {res['adapter_mb']:.1f} MB  ctx {args.ctx}")
    print(f"{'batch':>5} {'adapters':>8} {'floor GB':>9} {'floor ms':>9} {'step ms':>8} {'floor/step':>10} {'graph err':>9}")
    for r in rows:
        err = "-" if r["graph_vs_eager_rel_err"] is None else f"{r['graph_vs_eager_rel_err']:.1e}"
        print(f"{r['batch']:>5} {r['adapters']:>8} {r['floor_gb']:>9.2f} {r['floor_ms']:>9.2f} {r['step_ms']:>8.2f} "
              f"{r['frac_of_floor']:>10.2f} {err:>9}")
    for r in rows:
        if "profile" in r:
            print(f"kernel time per step, batch {r['batch']} adapters {r['adapters']} (eager, top 10):")
            for name, us, n in r["profile"][:10]:
                print(f"  {us / 1e3:8.2f} ms  x{n:<5} {name[:90]}")


if __name__ == "__main__":
    main()

"""CUDA graphs for decode steps: one captured forward pass per batch-size bucket, any mix of adapters.

An eager decode step of an 8B model launches ~2,200 kernels through ~40 ms of Python; the GPU work
itself is ~15 ms. Replaying a captured graph launches them all at once. What makes one graph valid for
every step of its bucket:
  * inputs live in static buffers (ids, positions, KV slots, block tables, context lengths, adapter
    slots) refreshed by a few device copies before each replay; a batch of B rows pads up to the
    bucket with rows that write no KV (slot -1), attend to one key of block 0 and use no adapter;
  * the LoRA tile list is built inside the graph from the static adapter-slot buffer
    (kernels.lora.make_lora_meta is tensor ops only), and the LoRA kernels follow each slot's true
    rank read from the pool at run time, so a graph serves any mix of adapters and ranks; a slot
    loaded after capture is just new data in the pool's fixed tensors;
  * no tensor the graph reads is ever reallocated: the pool, the KV cache and these buffers are
    allocated once.
The engine captures every bucket (LoRA off and on) at start-up (`capture_all`); a shape not captured
yet (influence statistics switched off later, say) is captured the first time it is seen. All graphs
share one memory pool. `emulate=True` runs the same static-buffer path eagerly (CPU tests: the
padding and buffer logic is checked against the plain path without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.context import Context, reset_context, set_context
from kernels import dispatch
from kernels import lora as _lora


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, every 16 up to 256, every 64 beyond, and max_batch itself.
    A batch pads up to the next bucket: at most 15 wasted rows up to 256 (<= 1/17 of the batch beyond
    16), at most 63 beyond (< 1/4 at 257, < 1/8 from 512); fewer buckets mean less capture time."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    out += list(range(16, min(max_batch, 256) + 1, 16))
    out += list(range(320, max_batch, 64))
    out.append(max_batch)
    return sorted({b for b in out if b <= max_batch})


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph, or None when emulating
    batch: int
    lora: bool
    influence: bool
    hidden: torch.Tensor | None  # the captured forward's output [batch, hidden], static
    influence_count: int  # LoRA'd projections per token, counted at capture
    keep_alive: list  # tensors the captured kernels read by address (Triton's per-launch tables)


class DecodeGraphs:
    def __init__(self, model, lora_pool, max_batch: int, max_blocks: int, emulate: bool = False):
        self.model = model
        self.lora_pool = lora_pool
        self.emulate = emulate
        self.buckets = buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks
        p = next(model.parameters())
        dev = self.device = p.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.token_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.influence_sum = torch.zeros(n, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, bool, bool], _Graph] = {}
        self.mempool = None if emulate else torch.cuda.graph_pool_handle()
        self.captures = 0

    # --- which steps ---

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def accepts(self, out) -> bool:
        """Pure decode (one token per sequence), within the largest bucket and the block-table width."""
        sched = out.scheduled
        if not sched or len(sched) > self.max_batch:
            return False
        return all(s.num_new_tokens == 1 and len(s.seq.block_table) <= self.max_blocks for s in sched)

    # --- one step ---

    def _fill(self, out, bucket: int, block_size: int) -> bool:
        """Copy the step's inputs into the static buffers (padding rows included); True if any row
        uses an adapter."""
        ids, pos, slots, lens, lora_slots = [], [], [], [], []
        for s in out.scheduled:
            seq = s.seq
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
            lens.append(p + 1)
            lora_slots.append(seq.lora_slot)
        B, pad = len(ids), bucket - len(ids)
        width = max(len(s.seq.block_table) for s in out.scheduled)
        tables = [v for s in out.scheduled for v in s.seq.block_table + [0] * (width - len(s.seq.block_table))]
        flat = (ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + lens + [1] * pad
                + lora_slots + [-1] * pad + tables + [0] * (pad * width))
        buf = torch.tensor(flat, dtype=torch.int64)
        if self.device.type != "cpu":
            buf = buf.to(self.device)  # one host->device copy per step
        f = buf[:5 * bucket].view(5, bucket)
        self.input_ids[:bucket].copy_(f[0])
        self.positions[:bucket].copy_(f[1])
        self.slot_mapping[:bucket].copy_(f[2])
        self.seq_lens[:bucket].copy_(f[3])
        self.token_slots[:bucket].copy_(f[4])
        # columns past `width` keep stale ids: no sequence reads past its own length
        self.block_tables[:bucket, :width].copy_(buf[5 * bucket:].view(bucket, width))
        return self.lora_pool is not None and any(x >= 0 for x in lora_slots)

    def _fill_dummy(self, bucket: int) -> None:
        """Inputs that touch nothing: no KV write (slot -1), one key of block 0, no adapter."""
        self.input_ids[:bucket].zero_()
        self.positions[:bucket].zero_()
        self.slot_mapping[:bucket].fill_(-1)
        self.seq_lens[:bucket].fill_(1)
        self.token_slots[:bucket].fill_(-1)
        self.block_tables[:bucket, :1].zero_()

    @torch.inference_mode()
    def capture_all(self, collect_influence: bool) -> int:
        """Capture every bucket up front, largest first (smaller graphs then reuse its pool memory), with
        LoRA off and on: serving never pays a capture in the middle of a request. The LoRA graphs are
        captured with no adapter in any row; the kernels read slots and ranks at replay time."""
        n = 0
        for bucket in reversed(self.buckets):
            for lora in (False, True):
                if lora and self.lora_pool is None:
                    continue
                key = (bucket, lora, lora and collect_influence)
                if key in self.graphs:
                    continue
                self._fill_dummy(bucket)
                self.graphs[key] = self._capture(*key)
                n += 1
        return n

    def _forward(self, bucket: int, lora: bool, influence: bool) -> tuple[torch.Tensor, int]:
        ctx = Context(slot_mapping=self.slot_mapping[:bucket], block_tables=self.block_tables[:bucket],
                      seq_lens=self.seq_lens[:bucket], query_start_loc=self.query_start_loc[:bucket + 1])
        if lora:
            pool = self.lora_pool
            ctx.lora_meta = dispatch.make_lora_meta(self.token_slots[:bucket], num_slots=pool.rank.shape[0])
            ctx.lora_pool = pool
            if influence:
                ctx.influence_sum = self.influence_sum[:bucket]
                ctx.influence_sum.zero_()
        set_context(ctx)
        try:
            hidden = self.model(self.input_ids[:bucket], self.positions[:bucket])
        finally:
            reset_context()
        return hidden, ctx.influence_count

    def _capture(self, bucket: int, lora: bool, influence: bool) -> _Graph:
        if self.emulate:
            return _Graph(None, bucket, lora, influence, None, 0, [])
        # Warm up outside the capture: Triton compiles, and the launchers cache their small device
        # tables (a host->device copy is not allowed while capturing). The warm-up runs the real step
        # on the filled buffers, so the KV writes it does are the ones the replay repeats.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2 if self.captures == 0 else 1):
                self._forward(bucket, lora, influence)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader thread keeps copying into the pool on its own stream
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            hidden, count = self._forward(bucket, lora, influence)
        self.captures += 1
        # the launchers' table cache may be cleared later; the graph keeps its tables alive itself
        keep = list(getattr(_lora, "_TABLE_CACHE", {}).values())
        return _Graph(graph, bucket, lora, influence, hidden, count, keep)

    def run(self, out, block_size: int, collect_influence: bool):
        """Run the step's forward. Returns the hidden states of the B real rows and a function giving the
        per-row influence (mean over LoRA'd projections of |delta| / |base|), or None when not collected.
        The runner calls that function after sampling, whose sync has waited for the step anyway."""
        B = len(out.scheduled)
        bucket = self.bucket_for(B)
        lora = self._fill(out, bucket, block_size)
        influence = lora and collect_influence
        key = (bucket, lora, influence)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(bucket, lora, influence)
        if g.graph is None:  # emulation: the same buffers, run eagerly
            hidden, count = self._forward(bucket, lora, influence)
        else:
            g.graph.replay()
            hidden, count = g.hidden, g.influence_count
        if not (influence and count):
            return hidden[:B], None
        return hidden[:B], lambda: [float(x) for x in (self.influence_sum[:B] / count).cpu()]

"""CUDA graphs for engine steps: one captured forward pass per shape bucket, any mix of adapters.

An eager step of an 8B model launches ~2,200 kernels through ~40 ms of Python; the GPU work of a decode
step is ~15 ms. Replaying a captured graph launches them all at once. Two kinds of graph:
  * decode: B sequences with one new token each, B padded up to a batch bucket (1, 2, 4, 8, every 16 to
    256, every 64 beyond);
  * mixed: any step that also prefills (new prompts, prompt chunks, decode rows alongside), padded to
    `max_batch + 1` sequences (so there is always a padding one) and a token bucket. Padding sequences hold
    one token each; the tokens left over go to the last ones, at most a block-table row's worth each.
What makes one graph valid for every step of its shape:
  * inputs live in static buffers (ids, positions, KV slots, block tables, context lengths, query
    offsets, adapter slots) refreshed by a few device copies before each replay; padding tokens write no KV
    (slot -1), attend to block 0 only and use no adapter;
  * the LoRA tile list is built inside the graph from the static adapter-slot buffer
    (kernels.lora.make_lora_meta is tensor ops only), and the LoRA kernels follow each slot's true
    rank read from the pool at run time, so a graph serves any mix of adapters and ranks; a slot
    loaded after capture is just new data in the pool's fixed tensors;
  * no tensor the graph reads is ever reallocated: the pool, the KV cache and these buffers are
    allocated once; attention's launch grid depends on (tokens, sequences) only, both fixed per graph.
The engine captures every bucket (LoRA off and on) at start-up (`capture_all`); a shape not captured
yet (influence statistics switched off later, say) is captured the first time it is seen. All graphs
share one memory pool. `emulate=True` runs the same static-buffer path eagerly (CPU tests: the padding
and buffer logic is checked against the plain path without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from engine.context import Context, reset_context, set_context
from engine.lora_workspace import begin_step, end_step, lora_sizes
from engine.step_inputs import StepInputs, copy_pending, int64_tensor, padded_tables, to_device
from kernels import dispatch
from kernels import lora as _lora


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with a decode graph: 1, 2, 4, 8, every 16 up to 256, every 64 beyond, and max_batch
    itself. A batch pads up to the next bucket: at most 15 wasted rows up to 256 (<= 1/17 of the batch
    beyond 16), at most 63 beyond (< 1/4 at 257, < 1/8 from 512); fewer buckets mean less capture time."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    out += list(range(16, min(max_batch, 256) + 1, 16))
    out += list(range(320, max_batch, 64))
    out.append(max_batch)
    return sorted({b for b in out if b <= max_batch})


def token_buckets(max_batch: int, max_tokens: int) -> list[int]:
    """Token counts with a mixed-step graph. A mixed step pads to `max_batch + 1` sequences of >= 1 token, so a
    bucket holds the step's tokens plus one per missing sequence (at most max_batch of them): buckets run from
    2 x max_batch to max_tokens + max_batch, growing by half or a third (waste below a third of the bucket)."""
    top = max_tokens + max_batch
    b = 1 << max(4, (2 * max_batch - 1).bit_length())
    out = []
    while b < top:
        out.append(b)
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 512, 768, 1024, 1536, 2048, ...
    out.append(top)
    return out


def pad_lengths(pad_tokens: int, pad_seqs: int, cap: int) -> list[int]:
    """Tokens of each padding sequence: one each, the rest spread from the last one backwards, at most `cap`
    per sequence (the caller checked that pad_tokens <= pad_seqs * cap)."""
    lens = [1] * pad_seqs
    rest = pad_tokens - pad_seqs
    for i in range(pad_seqs - 1, -1, -1):
        if rest <= 0:
            break
        add = min(rest, cap - 1)
        lens[i] += add
        rest -= add
    return lens


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph, or None when emulating
    tokens: int
    seqs: int
    lora: bool
    influence: bool
    hidden: torch.Tensor | None  # the captured forward's output [tokens, hidden], static
    influence_count: int  # LoRA'd projections per token, counted at capture
    keep_alive: list  # tensors the captured kernels read by address (Triton's per-launch tables)


class StepGraphs:
    def __init__(self, model, lora_pool, max_batch: int, max_blocks: int, block_size: int, emulate: bool = False,
                 max_tokens: int = 0):
        self.model = model
        self.block_size = block_size
        # a padding sequence's tokens must fit its block-table row (all of whose entries point at block 0)
        self.pad_cap = max_blocks * block_size
        self.lora_pool = lora_pool
        self.lora_sizes = lora_sizes(model)
        self.emulate = emulate
        self.buckets = buckets(max_batch)
        self.max_batch = self.buckets[-1]
        # mixed steps need at least one padding sequence of spare room: none when max_tokens is 0
        self.token_buckets = token_buckets(self.max_batch, max_tokens) if max_tokens > 0 else []
        # mixed graphs hold one sequence more than the largest batch, so a step that runs max_batch sequences
        # (the one admitting the last of a full batch, frequent at saturation) still has a padding sequence
        self.mixed_seqs = self.max_batch + 1
        self.max_blocks = max_blocks
        p = next(model.parameters())
        dev = self.device = p.device
        n = self.mixed_seqs if self.token_buckets else self.max_batch
        t = max([n] + self.token_buckets)
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(t, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=dev)
        self.token_slots = torch.full((t,), -1, dtype=torch.int32, device=dev)
        self.influence_sum = torch.zeros(t, dtype=torch.float32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, int, bool, bool], _Graph] = {}
        self.mempool = None if emulate else torch.cuda.graph_pool_handle()
        self.captures = 0

    # --- which steps ---

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def shape_of(self, out) -> tuple[int, int] | None:
        """(tokens, sequences) of the graph for this step, or None when it runs eagerly."""
        sched = out.scheduled
        if not sched or len(sched) > self.max_batch:
            return None
        if any(len(s.seq.block_table) > self.max_blocks for s in sched):
            return None
        if all(s.num_new_tokens == 1 for s in sched):
            b = self.bucket_for(len(sched))
            return b, b
        real_t, pad_b = sum(s.num_new_tokens for s in sched), self.mixed_seqs - len(sched)  # pad_b >= 1
        for t in self.token_buckets:
            if t >= real_t + pad_b:
                return (t, self.mixed_seqs) if t - real_t <= pad_b * self.pad_cap else None
        return None

    # --- one step ---

    def _fill(self, out, tokens: int, seqs: int, block_size: int, prev_ids: torch.Tensor | None = None) -> StepInputs:
        """Copy the step's inputs into the static buffers (padding included); returns the real rows' layout.
        Tokens still in flight come from `prev_ids` on the device (ModelRunner.launch)."""
        x = StepInputs.of(out, block_size)
        ids, pos, slots, lora_slots, lens, qsl = x.input_ids, x.positions, x.slot_mapping, x.token_slots, \
            x.seq_lens, x.qsl
        real_t, real_b = qsl[-1], len(lens)
        pad_t, pad_b = tokens - real_t, seqs - real_b
        pad_lens = pad_lengths(pad_t, pad_b, self.pad_cap)
        all_qsl = qsl + list(accumulate(pad_lens, initial=real_t))[1:]
        width = max(max(len(s.seq.block_table) for s in out.scheduled),
                    -(-max(pad_lens, default=1) // block_size))
        tables = padded_tables(out.scheduled, width, 0)
        flat = (ids + [0] * pad_t + pos + [0] * pad_t + slots + [-1] * pad_t + lora_slots + [-1] * pad_t
                + lens + pad_lens + all_qsl + tables + [0] * (pad_b * width))
        n_fields = len(flat)
        buf = to_device(int64_tensor(flat + x.pending_dst + x.pending_src), self.device)  # one copy per step
        f = buf[:4 * tokens].view(4, tokens)
        self.input_ids[:tokens].copy_(f[0])
        self.positions[:tokens].copy_(f[1])
        self.slot_mapping[:tokens].copy_(f[2])
        self.token_slots[:tokens].copy_(f[3])
        o = 4 * tokens
        self.seq_lens[:seqs].copy_(buf[o:o + seqs])
        self.query_start_loc[:seqs + 1].copy_(buf[o + seqs:o + 2 * seqs + 1])
        # columns past `width` keep older block ids (all >= 0): no sequence reads past its own length
        self.block_tables[:seqs, :width].copy_(buf[o + 2 * seqs + 1:n_fields].view(seqs, width))
        copy_pending(self.input_ids, buf[n_fields:], prev_ids)
        return x

    def _fill_dummy(self, tokens: int, seqs: int) -> None:
        """Inputs that touch nothing: no KV write (slot -1), keys of block 0 only, no adapter."""
        self.input_ids[:tokens].zero_()
        self.positions[:tokens].zero_()
        self.slot_mapping[:tokens].fill_(-1)
        self.token_slots[:tokens].fill_(-1)
        lens = torch.tensor(pad_lengths(tokens, seqs, self.pad_cap), dtype=torch.int32)
        self.seq_lens[:seqs].copy_(lens)
        self.query_start_loc[:seqs + 1].copy_(torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0)]))
        self.block_tables[:seqs].zero_()

    @torch.inference_mode()
    def capture_all(self, collect_influence: bool) -> int:
        """Capture every shape up front, largest first (smaller graphs then reuse its pool memory), with LoRA
        off and on: serving never pays a capture in the middle of a request. The LoRA graphs are captured
        with no adapter in any row; the kernels read slots and ranks at replay time."""
        shapes = [(t, self.mixed_seqs) for t in reversed(self.token_buckets)]
        shapes += [(b, b) for b in reversed(self.buckets)]
        n = 0
        for tokens, seqs in shapes:
            for lora in (False, True):
                if lora and self.lora_pool is None:
                    continue
                key = (tokens, seqs, lora, lora and collect_influence)
                if key in self.graphs:
                    continue
                self._fill_dummy(tokens, seqs)
                self.graphs[key] = self._capture(*key)
                n += 1
        return n

    def _forward(self, tokens: int, seqs: int, lora: bool, influence: bool) -> tuple[torch.Tensor, int]:
        ctx = Context(slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:seqs],
                      seq_lens=self.seq_lens[:seqs], query_start_loc=self.query_start_loc[:seqs + 1])
        if lora:
            pool = self.lora_pool
            ctx.lora_meta = dispatch.make_lora_meta(self.token_slots[:tokens], num_slots=pool.rank.shape[0])
            ctx.lora_pool = pool
            if influence:
                ctx.influence_sum = self.influence_sum[:tokens]
                ctx.influence_sum.zero_()
            # allocated and zeroed inside the capture: the graph's own pool memory, one memset node per replay
            begin_step(ctx, self.lora_sizes)
        set_context(ctx)
        try:
            hidden = self.model(self.input_ids[:tokens], self.positions[:tokens])
            end_step(ctx)
        finally:
            reset_context()
        return hidden, ctx.influence_count

    def _capture(self, tokens: int, seqs: int, lora: bool, influence: bool) -> _Graph:
        if self.emulate:
            return _Graph(None, tokens, seqs, lora, influence, None, 0, [])
        # Warm up outside the capture: Triton compiles, and the launchers cache their small device
        # tables (a host->device copy is not allowed while capturing). The warm-up runs the real step
        # on the filled buffers, so the KV writes it does are the ones the replay repeats.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2 if self.captures == 0 else 1):
                self._forward(tokens, seqs, lora, influence)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader thread keeps copying into the pool on its own stream
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            hidden, count = self._forward(tokens, seqs, lora, influence)
        self.captures += 1
        # the launchers' table cache may be cleared later; the graph keeps its tables alive itself
        keep = list(getattr(_lora, "_TABLE_CACHE", {}).values())
        return _Graph(graph, tokens, seqs, lora, influence, hidden, count, keep)

    def run(self, out, shape: tuple[int, int], block_size: int, collect_influence: bool,
            prev_ids: torch.Tensor | None = None):
        """Run the step's forward. Returns the hidden states of the real tokens [T_real, hidden], the step's
        layout, and the per-token influence sums [T_real] with the number of LoRA'd projections behind them
        (None, 0 when not collected), as the eager path has them in its context. `shape` is shape_of(out)."""
        tokens, seqs = shape
        x = self._fill(out, tokens, seqs, block_size, prev_ids)
        lora = self.lora_pool is not None and x.uses_lora
        influence = lora and collect_influence
        key = (tokens, seqs, lora, influence)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(*key)
        if g.graph is None:  # emulation: the same buffers, run eagerly
            hidden, count = self._forward(tokens, seqs, lora, influence)
        else:
            g.graph.replay()
            hidden, count = g.hidden, g.influence_count
        real_t = x.qsl[-1]
        sums = self.influence_sum[:real_t] if influence else None
        return hidden[:real_t], x, sums, count

"""Tensors in, tokens out: lay a SchedulerOutput out as one flat batch, run the model, sample.

Per step the runner builds, once, everything the layers need (docs/engine-kernels.md): token ids and
positions of every scheduled token in batch order, the KV slot of each, block tables, context
lengths, query start offsets and each token's adapter slot (turned into a LoRABatchMeta). These reach
the layers through engine.context; logits are computed only for the rows that sample.

A step is `launch`ed (inputs copied, forward, logits and the sampler's choice queued on the GPU, their host
copies queued behind them) and later `collect`ed (wait for its event, read the lists). Nothing in `launch`
waits for the GPU, so the engine can queue step k+1 while step k runs and read step k's tokens afterwards
(EngineConfig.async_steps): tokens of step k that step k+1 consumes go from the sampler's output to the
input ids on the device (StepInputs.pending_*). `run` is launch + collect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.context import Context, reset_context, set_context
from engine.cuda_graph import StepGraphs
from engine.layers.sampler import SampleLaunch, SampleResult, Sampler
from engine.lora_workspace import begin_step, end_step, lora_sizes
from engine.models.llama import LlamaForCausalLM
from engine.scheduler import SchedulerOutput
from engine.step_inputs import StepInputs, copy_pending, int64_tensor, padded_tables, to_device, to_host
from kernels import dispatch


@dataclass
class StepResult:
    sampled: SampleResult | None  # rows = scheduled entries with sample=True, in batch order
    logits: torch.Tensor | None  # [rows, vocab] float32 when keep_logits, else None
    # per scheduled entry: sum over its tokens of the mean LoRA delta ratio (0 when no adapter)
    influence: list[float]


@dataclass
class LaunchedStep:
    """A step queued on the device: what `collect` reads once it has finished."""

    out: SchedulerOutput
    x: StepInputs
    sample: SampleLaunch | None  # None when no row samples (a prefill chunk only)
    influence: torch.Tensor | None  # [T] float32 per-token influence, host copy on its way; None if not collected
    logits: torch.Tensor | None  # [rows, vocab] float32 when keep_logits
    done: torch.cuda.Event | None  # recorded after the host copies (CUDA); None on CPU
    # set by the engine: a sequence with a token of this step in flight has presence/frequency penalties
    needs_history: bool = False

    @property
    def sampled_ids(self) -> torch.Tensor | None:
        """The sampled ids on the device, for the next step's PENDING tokens."""
        return None if self.sample is None else self.sample.chosen


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, sampler: Sampler,
                 lora_pool=None, collect_influence: bool = True):
        self.model = model
        self.block_size = block_size
        self.sampler = sampler
        self.lora_pool = lora_pool
        self.collect_influence = collect_influence
        self.keep_logits = False  # tests read the logits of each sampled row
        self.graphs: StepGraphs | None = None  # set by enable_cuda_graphs
        self.graph_steps = 0  # steps whose forward replayed a CUDA graph (or its CPU emulation)
        self.eager_steps = 0
        self.lora_sizes = lora_sizes(model)  # sizes the per-step LoRA workspace (engine/lora_workspace.py)
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_caches, self.v_caches = [], []
        for layer in model.layers:
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = k, v
            self.k_caches.append(k)
            self.v_caches.append(v)

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, emulate: bool = False,
                             capture: bool = False, max_tokens: int = 0) -> None:
        """Replay CUDA graphs for steps of up to `max_batch` sequences (engine/cuda_graph.py): pure decode
        steps, and with `max_tokens` (the step token budget) also steps that prefill. `emulate` runs the same
        padded static-buffer path eagerly, for CPU tests; `capture` captures every shape now instead of on
        first use."""
        if not emulate and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        max_blocks = min(self.k_caches[0].shape[0], -(-max_model_len // self.block_size))
        self.graphs = StepGraphs(self.model, self.lora_pool, max_batch, max_blocks, self.block_size,
                                   emulate=emulate, max_tokens=max_tokens)
        if capture and not emulate:
            self.graphs.capture_all(self.collect_influence)

    def _prepare(self, out: SchedulerOutput, prev_ids: torch.Tensor | None):
        x = StepInputs.of(out, self.block_size)
        width = max(len(s.seq.block_table) for s in out.scheduled)
        tables = padded_tables(out.scheduled, width, -1)
        dev = self.device
        # One host->device copy for the whole step (each torch.tensor(..., device=cuda) from a list is a
        # copy plus a stream sync): int64 fields first, then the int32 ones, cast on the device at once.
        T, B = len(x.input_ids), len(out.scheduled)
        flat = x.input_ids + x.positions + x.slot_mapping + tables + x.seq_lens + x.qsl + x.token_slots
        n_fields = len(flat)
        buf = to_device(int64_tensor(flat + x.pending_dst + x.pending_src), dev)
        ids_t, pos_t, slots_t = buf[:T], buf[T:2 * T], buf[2 * T:3 * T]
        copy_pending(ids_t, buf[n_fields:], prev_ids)
        i32 = buf[3 * T:n_fields].to(torch.int32)
        tables_t, seq_lens_t, qsl_t, token_slots_t = i32.split([B * width, B, B + 1, T])
        ctx = Context(slot_mapping=slots_t, block_tables=tables_t.view(B, width), seq_lens=seq_lens_t,
                      query_start_loc=qsl_t)
        if self.lora_pool is not None and x.uses_lora:
            # the pool size bounds the number of token tiles, and so the LoRA kernels' launch grids
            ctx.lora_meta = dispatch.make_lora_meta(token_slots_t, num_slots=self.lora_pool.rank.shape[0])
            ctx.lora_pool = self.lora_pool
            if self.collect_influence:
                ctx.influence_sum = torch.zeros(T, dtype=torch.float32, device=dev)
            begin_step(ctx, self.lora_sizes)
        return ids_t, pos_t, ctx, x

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> StepResult:
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev_ids: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the step on the device. `prev_ids`: the previous step's sampled ids on the device (LaunchedStep.
        sampled_ids), where this step's PENDING tokens are read from."""
        shape = self.graphs.shape_of(out) if self.graphs is not None else None
        if shape is not None:
            self.graph_steps += 1
            hidden, x, infl_sum, infl_count = self.graphs.run(out, shape, self.block_size, self.collect_influence,
                                                              prev_ids)
        else:
            self.eager_steps += 1
            input_ids, positions, ctx, x = self._prepare(out, prev_ids)
            set_context(ctx)
            try:
                hidden = self.model(input_ids, positions)
                end_step(ctx)
            finally:
                reset_context()
            infl_sum, infl_count = ctx.influence_sum, ctx.influence_count
        rows = x.logits_rows
        sample = logits = None
        if rows:
            # decode steps sample every row: no gather (and a gather's index goes up without waiting for the GPU)
            picked = hidden if len(rows) == hidden.shape[0] else hidden[to_device(torch.tensor(rows), self.device)]
            logits = self.model.compute_logits(picked)
            sample = self.sampler.launch(logits, [s.seq for s in out.scheduled if s.sample])
        influence = to_host(infl_sum / infl_count) if infl_sum is not None and infl_count else None
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        kept = logits.float() if self.keep_logits and logits is not None else None
        return LaunchedStep(out, x, sample, influence, kept, done)

    def collect(self, step: LaunchedStep) -> StepResult:
        """The launched step's tokens, logprobs and influence on the host (waits for it to finish)."""
        if step.done is not None:
            step.done.synchronize()
        influence = [0.0] * len(step.out.scheduled)
        if step.influence is not None:
            influence = per_sequence_sums(step.influence, step.x.qsl)
        if step.sample is None:
            return StepResult(None, None, influence)
        return StepResult(self.sampler.finish(step.sample), step.logits, influence)


def per_sequence_sums(per_token: torch.Tensor, qsl: list[int]) -> list[float]:
    """Sum a CPU [T] float32 tensor over each sequence's tokens (query start offsets `qsl`, B + 1 of them).

    Runs after every LoRA step while the GPU waits for the next one: a decode step (one token per sequence) needs
    no reduction, and a mixed step one index_add_; torch.segment_reduce plus a float() per row cost ~0.37 ms at
    batch 256 on the 2-core VM, ~0.01 ms this way."""
    b = len(qsl) - 1
    if per_token.shape[0] == b:
        return per_token.tolist()
    lens = torch.tensor(qsl).diff()
    owner = torch.repeat_interleave(torch.arange(b), lens)
    return torch.zeros(b, dtype=per_token.dtype).index_add_(0, owner, per_token).tolist()

"""The loop: requests in, token deltas out.

    add_request ──▶ Sequence(s) ──▶ Scheduler ──▶ BlockManager / AdapterCache
    step():   schedule ─▶ ModelRunner.launch ─▶ book computed tokens ─▶ collect: tokens, stop checks ─▶ RequestOutput
    abort():  frees the request's blocks and adapter slot at once

`step` returns one RequestOutput per request that produced something (new text, or finished); each
carries the deltas since the last step and the full text so far, so both streaming and offline callers
read the same object.

Async steps (EngineConfig.async_steps, on for CUDA): step k is launched before step k-1's tokens are read
back, so the GPU goes from one step to the next while the host schedules, builds inputs and does the
bookkeeping (at batch 256 that host work is a few ms a step, all of which the GPU used to wait through).
A token not read back yet is PENDING in its sequence (engine/sequence.py); the step that consumes it copies
it from the sampler's output on the device. What this changes: a request's tokens reach `step`'s outputs one
call later, and a sequence that stops (EOS, stop string) has one more step computed for it that is dropped.
Tokens, logprobs and influence are the same as with the steps run one at a time. Steps that need every
earlier token on the host (presence/frequency penalties) run one at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.errors import CapacityError, EngineConfigError, RequestError
from engine.influence import influence_of
from engine.layers.sampler import Sampler
from engine.loader import load_model
from engine.model_runner import LaunchedStep, ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything so far (stop string excluded)
    token_ids: list[int]
    delta_text: str  # new since the previous RequestOutput of this request
    delta_token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" (adapter failed to load)
    stop_reason: str | int | None = None
    logprobs: list | None = None  # per token: (logprob, [(id, logprob), ...]); None if not asked
    delta_logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[CompletionOutput]
    finished: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from shared prefix blocks
    influence: dict[str, dict] = field(default_factory=dict)  # adapter -> tokens, delta_ratio, share

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    adapter: object
    seqs: list[Sequence]


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, adapters=None):
        """adapters: an engine.adapters.AdapterCache to use; None builds one from the config."""
        self.config = config = config or EngineConfig()
        config.validate()
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.max_model_len = config.model_len(self.model_config)
        dtype = config.torch_dtype()
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineConfigError(f"device {config.device!r} requested but CUDA is not available")
        self.tokenizer = Tokenizer(self.model_dir)
        self.model = load_model(self.model_dir, dtype, config.device, max_positions=self.max_model_len,
                                quantization=config.quantization, quant_group_size=config.quant_group_size)
        if config.device == "cpu" and dtype == torch.float32 and config.cpu_decode_layouts:
            # faster decode matmuls for some memory (LlamaForCausalLM)
            self.model.prepare_cpu_decode(native=config.cpu_native_kernels)
        if adapters is None:
            from engine.adapters.cache import AdapterCache

            adapters = AdapterCache(self.model_config, num_slots=config.num_lora_slots,
                                    max_rank=config.max_lora_rank, device=config.device, dtype=dtype,
                                    host_bytes=config.host_adapter_bytes)
        self.adapters = adapters
        free = None
        if config.device.startswith("cuda") and config.num_kv_blocks is None:
            # after the weights and the adapter slot pool: the KV cache takes a share of what is left
            free = torch.cuda.mem_get_info()[0]
        num_blocks = config.kv_blocks_for(self.model_config, free)
        eos = frozenset(self.tokenizer.eos_token_ids | set(self.model_config.eos_token_ids))
        self.eos_token_ids = eos
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, adapters,
                                   adapter_wait_s=config.adapter_admit_wait_ms / 1000.0,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, Sampler(eos),
                                  lora_pool=adapters.pool, collect_influence=config.collect_influence)
        if config.cuda_graphs and self.runner.device.type == "cuda":
            prefill_tokens = config.max_num_batched_tokens if config.cuda_graph_prefill else 0
            self.runner.enable_cuda_graphs(min(config.cuda_graph_max_batch, config.max_num_seqs),
                                             self.max_model_len, capture=True, max_tokens=prefill_tokens)
        self.async_steps = (config.async_steps if config.async_steps is not None
                            else self.runner.device.type == "cuda")
        self._in_flight: LaunchedStep | None = None  # the launched step whose tokens are not read back yet
        self.requests: dict[str, _Request] = {}
        self._next_id = 0
        self.last_logits: torch.Tensor | None = None
        self.last_rows: list[str] = []

    def close(self) -> None:
        """Stop the adapter cache's background loader."""
        close = getattr(self.adapters, "close", None)
        if close is not None:
            close()

    # --- adapters ---

    def register_adapter(self, name: str, path: str | Path):
        return self.adapters.register(name, Path(path))

    # --- requests ---

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, adapter=None,
                    request_id: str | None = None) -> str:
        """Queue a request; every check happens before anything is queued, so a refusal changes nothing."""
        params = params or SamplingParams()
        params.validate(self.model_config.vocab_size)
        if request_id is None:
            request_id, self._next_id = f"req-{self._next_id}", self._next_id + 1
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
                raise RequestError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size})")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens leaves no room to generate "
                               f"(max_model_len {self.max_model_len})")
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_for(longest) > self.block_manager.num_blocks:
            raise CapacityError(f"a sequence of {longest} tokens needs more KV blocks than the cache has "
                                f"({self.block_manager.num_blocks} of {self.config.block_size} tokens)")
        adapter_hash = ""
        if adapter is not None:
            adapter_hash = self.adapters.spec(adapter).content_hash  # raises AdapterNotFound / AdapterError
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(prompt_ids), params, adapter=adapter, adapter_hash=adapter_hash,
                           arrival=now)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, list(prompt_ids), adapter, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its KV blocks and adapter slot are freed before this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    @property
    def step_in_flight(self) -> bool:
        """A launched step's tokens are still to be read back (the next `step` returns them)."""
        return self._in_flight is not None

    # --- the loop ---

    def step(self, stream: bool = True) -> list[RequestOutput]:
        """One engine step. Returns the outputs of the requests it moved on (with their new deltas); with
        `stream=False` only those of requests it finished (offline callers: an output object per running
        request per step is ~10 us of Python each, 2-3 ms a step at batch 256). With async steps the tokens
        returned are those of the step launched by the previous call."""
        touched: dict[str, _Request] = {}
        prev, self._in_flight = self._in_flight, None  # collected below, whatever happens
        if prev is not None and prev.needs_history:
            # penalties count every earlier token on the host: read the step in flight back first
            self._collect(prev, touched)
            prev = None
        out = self.scheduler.schedule()
        for seq, message in out.failed:
            seq.stop_reason = message
            if seq.request_id in self.requests:
                touched[seq.request_id] = self.requests[seq.request_id]
        if out.is_empty:
            if prev is not None:
                self._collect(prev, touched)
            return self._emit(touched, stream)
        try:
            launched = self.runner.launch(out, None if prev is None else prev.sampled_ids)
        except BaseException:
            if prev is not None:  # its tokens exist: no sequence may be left with one PENDING
                self._collect(prev, touched)
            raise
        if prev is not None:
            # the GPU runs the step just launched meanwhile; stopping sequences are finished here, and what
            # that step computes for them is dropped
            self._collect(prev, touched)
        if not self.async_steps:
            self._book(launched)
            self._collect(launched, touched)
            return self._emit(touched, stream)
        outputs = self._emit(touched, stream)  # before _book: no PENDING token of the new step in them
        self._book(launched)
        self._in_flight = launched
        return outputs

    def _book(self, launched: LaunchedStep) -> None:
        """The launched step's tokens are computed (for the scheduler); each sampling row's token is PENDING
        in its sequence until collected. Only a sequence with a PENDING token lacks history on the host, so
        the step needs collecting before the next is sampled when one of them has penalties."""
        self.scheduler.postprocess(launched.out)
        row = 0
        for entry in launched.out.scheduled:
            if entry.sample:
                seq = entry.seq
                if not seq.is_finished:
                    seq.append_pending(row)
                    p = seq.params
                    launched.needs_history |= bool(p.presence_penalty or p.frequency_penalty)
                row += 1

    def _collect(self, launched: LaunchedStep, touched: dict[str, _Request]) -> None:
        """Read a booked step back: influence, tokens, logprobs, stop checks. Sequences finished since it was
        launched (stopped by the step before it, or aborted) take nothing from it."""
        result = self.runner.collect(launched)
        row = 0
        for entry, infl in zip(launched.out.scheduled, result.influence):
            seq = entry.seq
            if entry.sample:
                row += 1
            if seq.is_finished:
                continue
            if seq.adapter is not None:
                # count each position once: tokens recomputed after a preemption were already counted
                fresh = min(entry.num_new_tokens, max(0, seq.num_computed_tokens - seq.influence_tokens))
                seq.influence_sum += infl * fresh / entry.num_new_tokens
                seq.influence_tokens += fresh
            if not entry.sample:
                continue
            token = result.sampled.token_ids[row - 1]
            lp = result.sampled.logprobs[row - 1]
            seq.resolve_pending(token)
            if lp is not None:
                seq.logprobs.append(lp)
            self._check_stop(seq, token)
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[req.request_id] = req
        # what the runner computed for the sampled rows, in order (read by parity tests)
        self.last_logits = result.logits
        self.last_rows = [e.seq.request_id for e in launched.out.scheduled if e.sample]

    def _emit(self, touched: dict[str, _Request], stream: bool = True) -> list[RequestOutput]:
        if not stream:
            touched = {k: r for k, r in touched.items() if all(s.is_finished for s in r.seqs)}
        outputs = [self._output(req) for req in touched.values()]
        for o in outputs:
            if o.finished:
                del self.requests[o.request_id]
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        delta = seq.detokenizer.add([token])
        before = len(seq.output_text)
        seq.output_text += delta
        reason = None
        if token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.eos_token_ids:  # the sampler held EOS back before min_tokens
            reason, seq.stop_reason = "stop", token
        if reason is None and p.stop and delta:
            start = max(0, before - max(len(s) for s in p.stop) + 1)
            hits = [(seq.output_text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.output_text = seq.output_text[:i]
                reason, seq.stop_reason = "stop", s
        if reason is None:
            if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
        if reason is not None:
            if reason == "length" or isinstance(seq.stop_reason, int):
                seq.output_text += seq.detokenizer.flush()
            self.scheduler.finish(seq, reason)

    def _output(self, req: _Request) -> RequestOutput:
        completions = []
        for seq in req.seqs:
            text = seq.output_text
            hold = 0
            if not seq.is_finished and seq.params.stop:
                # a stop string may be completed by the next token: never stream its first characters
                hold = max(len(s) for s in seq.params.stop) - 1
            end = max(seq.num_streamed_chars, len(text) - hold)
            delta_text = text[seq.num_streamed_chars:end]
            ids = seq.output_ids
            delta_ids = ids[seq.num_streamed_tokens:]
            want_lp = seq.params.logprobs is not None
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(ids), delta_text=delta_text,
                delta_token_ids=delta_ids, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if want_lp else None,
                delta_logprobs=seq.logprobs[seq.num_streamed_tokens:] if want_lp else None))
            seq.num_streamed_chars, seq.num_streamed_tokens = end, len(ids)
        finished = all(s.is_finished for s in req.seqs)
        out = RequestOutput(req.request_id, req.prompt_ids, completions, finished,
                            prompt_tokens=len(req.prompt_ids),
                            completion_tokens=sum(s.num_output_tokens for s in req.seqs),
                            cached_tokens=max(s.num_cached_tokens for s in req.seqs))
        if finished:
            total = sum(s.influence_sum for s in req.seqs)
            tokens = sum(s.influence_tokens for s in req.seqs)
            out.influence = {k: v.as_dict() for k, v in influence_of(req.adapter, total, tokens).items()}
        return out

    # --- offline ---

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list | None = None) -> list[RequestOutput]:
        """Run prompts to completion together; results in prompt order."""
        n = len(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * n
        alist = adapters if adapters is not None else [None] * n
        if len(plist) != n or len(alist) != n:
            raise RequestError("prompts, params and adapters must have the same length")
        ids = []
        try:
            for prompt, p, a in zip(prompts, plist, alist):
                ids.append(self.add_request(prompt, p, a))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < n:
            outs = self.step(stream=False)
            if not outs and not self.scheduler.running:
                time.sleep(0.001)  # only adapters loading in the background: wait for them
            for o in outs:
                if o.finished:
                    done[o.request_id] = o
        return [done[r] for r in ids]

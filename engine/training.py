"""LoRA training on the engine's own model, and per-example LoRA gradients for attribution.

The serving path is reused as is: the layers read LoRA weights from a slot pool in the step's Context
and attention goes through kernels.dispatch over a paged KV cache. Training makes the adapter a
*one-slot pool* whose A/B tensors are leaf tensors with requires_grad, puts every token in slot 0, and
gives each step a fresh KV cache sized for the batch (fresh, so the graph of one step never reaches
into the cache writes of the previous one). Autograd then flows through the PyTorch reference kernels
(kernels/lora.py, kernels/attention.py); the Triton kernels have no backward, so on CUDA set
OPENLORA_KERNELS=torch for training.

Data flow:
    tokenize_chat / tokenize_text   text -> TokenizedExample (ids, first labelled position)
    LoRAParams.create               a zero-delta adapter (A random, B = 0, as PEFT initialises it)
    train_lora                      AdamW over the A/B tensors, loss on labelled tokens only
    example_gradients               d(mean log-likelihood of the labelled tokens) / d(each A and B),
                                    named by PEFT key: the raw material of Proof-of-Attribution sketches
    LoRAParams.peft_tensors         (module, layer) -> (A, B) for engine.adapters.peft_io.save_peft_adapter

Only torch is needed here; progress is reported through a callback so the CLI can draw a bar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.adapters.peft_format import ALL_MODULES, lora_scale, module_shapes
from engine.adapters.peft_io import peft_key
from engine.context import Context, get_context, set_context
from engine.errors import EngineConfigError, RequestError
from kernels import dispatch

# The temporary KV cache's block size; any value works, since every step gets its own cache.
_BLOCK_SIZE = 16


# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence: tokens ids[label_start:] are predicted (each from the tokens before it)."""

    ids: tuple[int, ...]
    label_start: int  # >= 1: the first token has nothing to be predicted from
    tag: str | None = None  # who it belongs to (a contributor address); carried, never interpreted

    def __post_init__(self):
        if not 1 <= self.label_start < len(self.ids):
            raise RequestError(f"example of {len(self.ids)} tokens has no token to learn "
                               f"(label_start {self.label_start})")

    @property
    def num_labels(self) -> int:
        return len(self.ids) - self.label_start


def _cut_after_eos(ids: list[int], start: int, eos_ids: Iterable[int]) -> list[int]:
    # the template closes the turn with EOS and may add a newline after it; the model must learn to
    # stop at EOS, and what follows it is never generated, so it is not learned either
    eos = set(eos_ids)
    for i in range(start, len(ids)):
        if ids[i] in eos:
            return ids[:i + 1]
    return ids


def tokenize_chat(tokenizer, prompt: str, response: str, *, max_len: int = 256,
                  tag: str | None = None) -> TokenizedExample:
    """A user/assistant turn rendered with the model's chat template; only the answer is learned.

    The prompt is rendered with the generation prompt, exactly as serving renders it, so the adapter
    learns the continuation the engine will actually be asked for."""
    user = {"role": "user", "content": prompt}
    prompt_ids = tokenizer.encode_chat([user], add_generation_prompt=True)
    full = tokenizer.encode_chat([user, {"role": "assistant", "content": response}], add_generation_prompt=False)
    if full[:len(prompt_ids)] != prompt_ids:
        # a template whose full rendering does not extend the prompt rendering: fall back to the
        # served prompt followed by the answer's own tokens
        eos = sorted(tokenizer.eos_token_ids)
        full = prompt_ids + tokenizer.encode(response, add_special_tokens=False) + eos[:1]
    full = _cut_after_eos(full, len(prompt_ids), tokenizer.eos_token_ids)
    if len(prompt_ids) >= max_len:
        raise RequestError(f"prompt of {len(prompt_ids)} tokens does not fit max_len {max_len}")
    return TokenizedExample(tuple(full[:max_len]), len(prompt_ids), tag)


def tokenize_text(tokenizer, text: str, *, max_len: int = 256, tag: str | None = None) -> TokenizedExample:
    """A plain passage, learned as a whole (every token but the first)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if len(ids) < 2:
        raise RequestError("text example must be at least two tokens long")
    return TokenizedExample(tuple(ids[:max_len]), 1, tag)


# --------------------------------------------------------------------------------------------------
# The trainable adapter: a one-slot pool
# --------------------------------------------------------------------------------------------------


@dataclass
class LoRAParams:
    """A LoRA adapter laid out as a slot pool of one slot (docs/engine-kernels.md), so the model's
    LoRALinear layers read it unchanged: lora_a[m][l] [1, r, in], lora_b[m][l] [1, out, r]."""

    rank_value: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    lora_a: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    lora_b: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    rank: torch.Tensor = None  # [1] int32
    scale: torch.Tensor = None  # [1] float32

    @classmethod
    def create(cls, model_config, rank: int, alpha: float, target_modules: Iterable[str] = ALL_MODULES,
               *, use_rslora: bool = False, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoRAParams:
        """A fresh adapter whose delta is zero: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default, i.e.
        kaiming_uniform with a=sqrt(5)), B = 0."""
        targets = _check_targets(target_modules)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise EngineConfigError(f"rank must be a positive integer, got {rank!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise EngineConfigError(f"alpha must be a positive number, got {alpha!r}")
        gen = torch.Generator().manual_seed(seed)
        shapes = module_shapes(model_config)
        p = cls(rank, float(alpha), targets, use_rslora)
        for m in targets:
            fan_in, fan_out = shapes[m]
            bound = 1.0 / math.sqrt(fan_in)
            p.lora_a[m] = [((torch.rand(1, rank, fan_in, generator=gen) * 2 - 1) * bound).to(device, dtype)
                           for _ in range(model_config.num_hidden_layers)]
            p.lora_b[m] = [torch.zeros(1, fan_out, rank, device=device, dtype=dtype)
                           for _ in range(model_config.num_hidden_layers)]
        p._finish(device)
        return p

    @classmethod
    def from_weights(cls, model_config, weights, alpha: float | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoRAParams:
        """A served adapter (engine.adapters.peft_format.AdapterWeights) as a differentiable pool, so
        example_gradients can take gradients at its weights. The slot scale is the adapter's own."""
        targets = tuple(m for m in ALL_MODULES if any(k[0] == m for k in weights.tensors))
        if not targets:
            raise EngineConfigError("adapter has no LoRA tensors")
        shapes = module_shapes(model_config)
        p = cls(int(weights.rank), float(alpha if alpha is not None else weights.scale * weights.rank), targets, False)
        r = int(weights.rank)
        for m in targets:
            fan_in, fan_out = shapes[m]
            p.lora_a[m], p.lora_b[m] = [], []
            for layer in range(model_config.num_hidden_layers):
                a = torch.zeros(1, r, fan_in, dtype=dtype)
                b = torch.zeros(1, fan_out, r, dtype=dtype)
                pair = weights.tensors.get((m, layer))
                if pair is not None:
                    a[0, :pair[0].shape[0]] = pair[0].to(dtype)
                    b[0, :, :pair[1].shape[1]] = pair[1].to(dtype)
                p.lora_a[m].append(a.to(device))
                p.lora_b[m].append(b.to(device))
        p._finish(device, scale=float(weights.scale))
        return p

    def _finish(self, device, scale: float | None = None) -> None:
        for t in self.parameters():
            t.requires_grad_(True)
        self.rank = torch.tensor([self.rank_value], dtype=torch.int32, device=device)
        s = scale if scale is not None else lora_scale(self.alpha, self.rank_value, self.use_rslora)
        self.scale = torch.tensor([s], dtype=torch.float32, device=device)

    def parameters(self) -> list[torch.Tensor]:
        return [t for m in self.target_modules for t in (*self.lora_a[m], *self.lora_b[m])]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(PEFT key, leaf tensor [1, ...]) for every A and B, layers in order, A before B."""
        for m in self.target_modules:
            for layer, (a, b) in enumerate(zip(self.lora_a[m], self.lora_b[m])):
                yield peft_key(m, layer, "A"), a
                yield peft_key(m, layer, "B"), b

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT key -> detached float32 CPU copy in PEFT shape (A [r, in], B [out, r])."""
        return {n: t[0].detach().to("cpu", torch.float32).clone() for n, t in self.named_parameters()}

    @classmethod
    def from_named_tensors(cls, model_config, tensors: dict[str, torch.Tensor], like: LoRAParams,
                           device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoRAParams:
        """An adapter with the settings (rank, scale, targets) of `like` and the weights `tensors`
        (as named_tensors returns them, e.g. a training checkpoint): every key of `like` must be there."""
        p = cls(like.rank_value, like.alpha, like.target_modules, like.use_rslora)
        want = dict(like.named_parameters())
        ref = next(iter(want.values()))
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        if set(tensors) != set(want):
            missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
            raise EngineConfigError(f"checkpoint tensors do not match the adapter (missing {missing[:2]}, "
                                    f"unexpected {extra[:2]})")
        for m in like.target_modules:
            p.lora_a[m], p.lora_b[m] = [], []
            for layer in range(model_config.num_hidden_layers):
                for ab, out in (("A", p.lora_a[m]), ("B", p.lora_b[m])):
                    t = tensors[peft_key(m, layer, ab)]
                    if tuple(t.shape) != tuple(want[peft_key(m, layer, ab)].shape[1:]):
                        raise EngineConfigError(f"checkpoint tensor {peft_key(m, layer, ab)} has shape {list(t.shape)}")
                    out.append(t.detach().to(device, dtype).clone()[None])
        p._finish(device, scale=float(like.scale[0]))
        return p

    def peft_tensors(self) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """(module, layer) -> (A [r, in], B [out, r]), detached copies, for save_peft_adapter."""
        return {(m, layer): (a[0].detach().clone(), b[0].detach().clone())
                for m in self.target_modules
                for layer, (a, b) in enumerate(zip(self.lora_a[m], self.lora_b[m]))}

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


def _check_targets(target_modules: Iterable[str]) -> tuple[str, ...]:
    targets = list(dict.fromkeys(target_modules))
    bad = [m for m in targets if m not in ALL_MODULES]
    if not targets or bad:
        raise EngineConfigError(f"target modules must be a non-empty subset of {', '.join(ALL_MODULES)}"
                                + (f"; unknown: {', '.join(bad)}" if bad else ""))
    return tuple(sorted(targets, key=ALL_MODULES.index))


# --------------------------------------------------------------------------------------------------
# Forward with a trainable adapter
# --------------------------------------------------------------------------------------------------


@contextmanager
def adapter_step(model, pool, seq_lens: list[int], slot: int = 0, seq_slots: list[int] | None = None):
    """Run the model over whole sequences of the given lengths, every token in `slot` of `pool` (a
    LoRAParams, or any slot pool with lora_a, lora_b, rank and scale), or, with `seq_slots`, every
    token of sequence i in slot seq_slots[i]. With `pool` None the base model runs (no LoRA).

    Sets a Context and a KV cache sized for the batch, and puts back whatever context and caches the
    model had, so this can run on a serving model between engine steps."""
    cfg = model.config
    p = next(model.parameters())
    dev, dtype = p.device, p.dtype
    bs = _BLOCK_SIZE
    blocks = [-(-n // bs) for n in seq_lens]
    width = max(blocks)
    tables, slot_mapping, first = [], [], 0
    for n, nb in zip(seq_lens, blocks):
        table = list(range(first, first + nb))
        tables.append(table + [-1] * (width - nb))
        slot_mapping.extend(table[i // bs] * bs + i % bs for i in range(n))
        first += nb
    qsl = [0]
    for n in seq_lens:
        qsl.append(qsl[-1] + n)
    t = qsl[-1]
    if pool is None:
        token_slots = None
    elif seq_slots is None:
        token_slots = torch.full((t,), slot, dtype=torch.int32, device=dev)
    else:
        if len(seq_slots) != len(seq_lens):
            raise RequestError("seq_slots must give one slot per sequence")
        token_slots = torch.tensor([s for s, n in zip(seq_slots, seq_lens) for _ in range(n)], dtype=torch.int32,
                                   device=dev)
    ctx = Context(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        lora_meta=None if pool is None else dispatch.make_lora_meta(token_slots,
                                                                    num_slots=int(pool.rank.shape[0])),
        lora_pool=pool,
    )
    shape = (first, bs, cfg.num_key_value_heads, cfg.head_dim)
    attns = [layer.self_attn.attn for layer in model.layers]
    saved_caches = [(a.k_cache, a.v_cache) for a in attns]
    saved_ctx = get_context()
    for a in attns:
        a.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
        a.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
    set_context(ctx)
    try:
        yield
    finally:
        set_context(saved_ctx)
        for a, (k, v) in zip(attns, saved_caches):
            a.k_cache, a.v_cache = k, v


def token_logprobs(model, lora: LoRAParams, batch: list[TokenizedExample],
                   seq_slots: list[int] | None = None) -> list[torch.Tensor]:
    """Per example, the log-probability of each labelled token ([num_labels] float32, differentiable
    with respect to the adapter). Logits are computed only for the rows that predict a label: the
    vocabulary projection is the largest matmul of a small model. `seq_slots`: see adapter_step."""
    if not batch:
        raise RequestError("empty batch")
    weight = next(model.parameters())
    if torch.is_grad_enabled() and dispatch.use_triton(weight):
        # the Triton kernels write their outputs in place with no autograd formula behind them
        raise EngineConfigError("gradients need the PyTorch reference kernels: set OPENLORA_KERNELS=torch")
    dev = weight.device
    ids = torch.tensor([i for ex in batch for i in ex.ids], dtype=torch.long, device=dev)
    positions = torch.cat([torch.arange(len(ex.ids)) for ex in batch]).to(dev)
    rows, targets, off = [], [], 0
    for ex in batch:
        rows.extend(range(off + ex.label_start - 1, off + len(ex.ids) - 1))
        targets.extend(ex.ids[ex.label_start:])
        off += len(ex.ids)
    with adapter_step(model, lora, [len(ex.ids) for ex in batch], seq_slots=seq_slots):
        hidden = model(ids, positions)
    logits = model.compute_logits(hidden[torch.tensor(rows, device=dev)]).float()
    tgt = torch.tensor(targets, dtype=torch.long, device=dev)
    lp = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
    return list(lp.split([ex.num_labels for ex in batch]))


def example_gradients(model, adapter: LoRAParams, example: TokenizedExample,
                      reduction: str = "mean") -> dict[str, torch.Tensor]:
    """Gradient of the example's labelled-token log-likelihood with respect to every LoRA tensor.

    For a served request, `example` is the prompt followed by the generated tokens with
    label_start = len(prompt). `reduction="mean"` (the default) differentiates the mean per-token
    log-likelihood, so long and short answers are on one scale; "sum" the total. Keys are PEFT keys
    (`...q_proj.lora_A.weight`), values are detached float32 tensors of the PEFT shapes (A [r, in],
    B [out, r]) on the adapter's device. The adapter's own .grad fields are left untouched."""
    if reduction not in ("mean", "sum"):
        raise RequestError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    names, leaves = zip(*adapter.named_parameters())
    with torch.enable_grad():
        lp = token_logprobs(model, adapter, [example])[0]
        objective = lp.mean() if reduction == "mean" else lp.sum()
        grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    return {n: (torch.zeros_like(leaf[0]) if g is None else g[0]).detach().float()
            for n, leaf, g in zip(names, leaves, grads)}


@dataclass
class _ReplicaPool:
    """`n` copies of one adapter as an n-slot pool of fresh leaf tensors (lora_a[m][l] [n, r, in])."""

    lora_a: dict[str, list[torch.Tensor]]
    lora_b: dict[str, list[torch.Tensor]]
    rank: torch.Tensor
    scale: torch.Tensor


def batch_example_gradients(model, adapter: LoRAParams, examples: list[TokenizedExample],
                            reduction: str = "mean") -> list[dict[str, torch.Tensor]]:
    """example_gradients for several examples with one forward and one backward pass.

    Each example runs in its own slot of a pool holding copies of the adapter; sequences never attend
    to each other, so the gradient with respect to slot i's copy is exactly example i's gradient."""
    if reduction not in ("mean", "sum"):
        raise RequestError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not examples:
        return []
    n = len(examples)

    def copies(t: torch.Tensor) -> torch.Tensor:
        return t.detach().expand(n, *t.shape[1:]).clone().requires_grad_(True)

    pool = _ReplicaPool({m: [copies(t) for t in adapter.lora_a[m]] for m in adapter.target_modules},
                        {m: [copies(t) for t in adapter.lora_b[m]] for m in adapter.target_modules},
                        adapter.rank.expand(n).clone(), adapter.scale.expand(n).clone())
    names, leaves = [], []
    for m in adapter.target_modules:
        for layer, (a, b) in enumerate(zip(pool.lora_a[m], pool.lora_b[m])):
            names += [peft_key(m, layer, "A"), peft_key(m, layer, "B")]
            leaves += [a, b]
    with torch.enable_grad():
        lps = token_logprobs(model, pool, examples, seq_slots=list(range(n)))
        objective = sum(lp.mean() if reduction == "mean" else lp.sum() for lp in lps)
        grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, leaf, g in zip(names, leaves, grads):
        g = torch.zeros_like(leaf) if g is None else g
        for i in range(n):
            out[i][name] = g[i].detach().float()
    return out


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ALL_MODULES
    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 4
    warmup_steps: int | None = None  # None: 10% of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("rank", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("alpha", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise EngineConfigError(f"{name} must be a positive number, got {v!r}")
        _check_targets(self.target_modules)


@dataclass(frozen=True)
class Checkpoint:
    """The adapter as it was after `step` optimizer steps (1-based), and the learning rate of that
    step: the (weights, step size) pairs TracIn sums over. `tensors` maps PEFT keys to detached
    float32 copies in PEFT shapes (A [r, in], B [out, r]), as example_gradients names its output."""

    step: int
    lr: float
    tensors: dict[str, torch.Tensor]


@dataclass
class TrainResult:
    lora: LoRAParams
    losses: list[float]  # mean labelled-token cross-entropy of each step's batch
    seconds: float
    tokens: int  # labelled tokens seen
    checkpoints: list[Checkpoint] = field(default_factory=list)  # in step order


def checkpoint_steps(steps: int, k: int) -> list[int]:
    """k steps spread evenly over a run of `steps`, ending at the last: round(steps * i / k), i = 1..k."""
    if k < 1 or steps < 1:
        raise EngineConfigError(f"need at least one checkpoint and one step, got k={k}, steps={steps}")
    return sorted({max(1, round(steps * i / k)) for i in range(1, k + 1)})


def _lr_at(step: int, cfg: TrainConfig) -> float:
    # linear warm-up (Adam's moments are noisy at first), then cosine decay to a tenth
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 10)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    # epochs of a seeded shuffle; a batch may span the end of one epoch and the start of the next
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(torch.randperm(n, generator=gen).tolist())
        yield order[:batch_size]
        order = order[batch_size:]


def train_lora(model, examples: list[TokenizedExample], cfg: TrainConfig,
               progress: Callable[[int, float], None] | None = None,
               checkpoint_at: Iterable[int] = ()) -> TrainResult:
    """Fine-tune a fresh LoRA adapter on `examples` with AdamW; the base weights are never changed.

    progress(step, loss) is called after every step (1-based). After each step listed in
    `checkpoint_at` (1-based, at most cfg.steps) a Checkpoint of the adapter is kept in the result."""
    cfg.validate()
    if not examples:
        raise RequestError("no training examples")
    keep = set(checkpoint_at)
    if any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.steps for k in keep):
        raise EngineConfigError(f"checkpoint steps must be integers in [1, {cfg.steps}], got {sorted(keep, key=str)}")
    checkpoints: list[Checkpoint] = []
    p = next(model.parameters())
    torch.manual_seed(cfg.seed)
    lora = LoRAParams.create(model.config, cfg.rank, cfg.alpha, cfg.target_modules, seed=cfg.seed,
                             device=p.device, dtype=p.dtype)
    params = lora.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for step, idx in enumerate(_batches(len(examples), min(cfg.batch_size, len(examples)), cfg.steps, gen)):
        batch = [examples[i] for i in idx]
        with torch.enable_grad():
            lps = token_logprobs(model, lora, batch)
            # mean over all labelled tokens of the batch (each token counts once, as in HF's loss)
            loss = -torch.cat(lps).mean()
            grads = torch.autograd.grad(loss, params)
        for t, g in zip(params, grads):
            t.grad = g
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise EngineConfigError(f"training diverged at step {step + 1} (loss {value}); lower the learning rate")
        losses.append(value)
        tokens += sum(ex.num_labels for ex in batch)
        if step + 1 in keep:
            checkpoints.append(Checkpoint(step + 1, _lr_at(step, cfg), lora.named_tensors()))
        if progress is not None:
            progress(step + 1, value)
    return TrainResult(lora, losses, time.perf_counter() - started, tokens, checkpoints)


@torch.no_grad()
def mean_loss(model, lora: LoRAParams | None, examples: list[TokenizedExample], batch_size: int = 8) -> float:
    """Mean labelled-token cross-entropy over `examples`, with the adapter (or the base model: None)."""
    if lora is None:
        # an all-zero delta is the base model; a rank-1 zero adapter keeps one code path
        lora = LoRAParams.create(model.config, 1, 1.0, ("q_proj",), device=next(model.parameters()).device,
                                 dtype=next(model.parameters()).dtype)
        for t in lora.parameters():
            t.zero_()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        lps = token_logprobs(model, lora, examples[i:i + batch_size])
        total -= float(torch.cat(lps).sum())
        count += sum(len(x) for x in lps)
    return total / count

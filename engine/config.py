"""Configuration as data: the model's shape (read from config.json) and the engine's knobs.

`ModelConfig.from_dir` is the single place a HF `config.json` is interpreted; everything after it
reads typed fields. Anything the model code cannot reproduce exactly is refused here with a
`ModelFormatError`, before a weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import EngineConfigError, ModelFormatError

# architecture name -> model_type it must carry; all three are the same network up to biases
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only (Llama 3.1 "frequency-dependent" scaling)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 (and Llama with attention_bias)
    o_bias: bool  # Llama with attention_bias only
    mlp_bias: bool
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    torch_dtype: str = "float32"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection, by HF name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{model_dir} has no config.json: not a HF-format model directory") from None
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{path}: unreadable config.json ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: config.json must be a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        model_type = raw.get("model_type", SUPPORTED_ARCHITECTURES[arch])
        if model_type != SUPPORTED_ARCHITECTURES[arch]:
            raise ModelFormatError(f"{source}: architecture {arch} with model_type {model_type!r}")

        def req_int(key: str, minimum: int = 1) -> int:
            v = raw.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ModelFormatError(f"{source}: {key} must be an integer >= {minimum}, got {v!r}")
            return v

        hidden, heads = req_int("hidden_size"), req_int("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise ModelFormatError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                   f"num_key_value_heads {kv_heads}")
        head_dim = raw.get("head_dim") or hidden // heads
        if not raw.get("head_dim") and hidden % heads:
            raise ModelFormatError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads")
        if head_dim % 2:
            raise ModelFormatError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFormatError(f"{source}: unsupported hidden_act {act!r} (only silu)")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        attention_bias = bool(raw.get("attention_bias", False))
        qwen2 = model_type == "qwen2"
        sliding = raw.get("sliding_window")
        if qwen2 and not raw.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window size but only use it behind this flag
        return cls(
            architecture=arch, model_type=model_type,
            vocab_size=req_int("vocab_size"), hidden_size=hidden,
            intermediate_size=req_int("intermediate_size"), num_hidden_layers=req_int("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float((raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta", 10000.0))),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            # transformers >= 5 writes rope_parameters (theta inside); older checkpoints rope_scaling
            rope_scaling=_parse_rope_scaling(raw.get("rope_parameters") or raw.get("rope_scaling"), source),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids,
            sliding_window=sliding if isinstance(sliding, int) else None,
            torch_dtype=str(raw.get("torch_dtype") or "float32"),
        )


def _parse_rope_scaling(rs, source: str) -> RopeScaling:
    if rs is None:
        return RopeScaling()
    if not isinstance(rs, dict):
        raise ModelFormatError(f"{source}: rope_scaling must be an object or null")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelFormatError(f"{source}: unsupported rope_scaling type {kind!r}; "
                               f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    try:
        return RopeScaling(
            rope_type=kind, factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{source}: malformed rope_scaling ({exc})") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EngineConfig:
    """The engine's knobs. Defaults suit CPU tests; `resolve` fills device-dependent ones."""

    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_memory_fraction (CUDA) or kv_cache_bytes (CPU)
    kv_memory_fraction: float = 0.5  # of free device memory after weights, CUDA only
    kv_cache_bytes: int = 256 * 2**20  # CPU budget when num_kv_blocks is None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_lora_slots: int = 8
    max_lora_rank: int = 16
    host_adapter_bytes: int = 2 * 2**30
    # CUDA: per step, how long admission may wait for the adapter loads it starts to have their device copy
    # queued (the loader thread reads the host tier first); such requests then join the step about to launch
    # (it waits on the GPU for the copy, ~2 ms for an 8B rank-16 adapter) instead of the next one. 0: never.
    adapter_admit_wait_ms: float = 5.0
    enable_prefix_caching: bool = True
    collect_influence: bool = True
    # CUDA only: pure-decode steps replay a CUDA graph captured per batch-size bucket (engine/cuda_graph.py)
    cuda_graphs: bool = True
    cuda_graph_max_batch: int = 256  # larger decode batches run eagerly
    # steps that prefill replay graphs too (padded to a token bucket and cuda_graph_max_batch sequences)
    cuda_graph_prefill: bool = True
    # queue step k+1 on the GPU before reading step k's tokens back (engine/llm_engine.py "async steps"): the
    # host's scheduling, input building and bookkeeping then overlap the GPU's work instead of leaving it idle.
    # None: on for CUDA, off for CPU (where nothing runs in the background to overlap with)
    async_steps: bool | None = None
    # CPU float32 only: extra weight layouts for decode-sized steps (engine/layers/linear.py CpuDecodeLayouts):
    # ~1.5-3x faster decode matmuls for a oneDNN-packed second copy of the projections (+~60% weight memory)
    cpu_decode_layouts: bool = True
    # with cpu_decode_layouts: decode-sized steps (up to 16 tokens) run the base matmul and the LoRA delta in
    # native kernels compiled on first use (kernels/native_cpu.py; needs a C++ compiler, else torch's paths run)
    cpu_native_kernels: bool = True
    # base weights of the projections: None (the model's dtype) or "q4" (4-bit, engine/layers/quant.py);
    # quant_group_size is the largest group, a projection it does not divide takes the largest that does
    quantization: str | None = None
    quant_group_size: int = 128

    def torch_dtype(self) -> torch.dtype:
        name = self.dtype or ("float32" if self.device == "cpu" else "bfloat16")
        if name not in _DTYPES:
            raise EngineConfigError(f"unknown dtype {name!r}; one of {', '.join(_DTYPES)}")
        dt = _DTYPES[name]
        if self.device == "cpu" and dt != torch.float32:
            raise EngineConfigError("the CPU path runs in float32 only")
        return dt

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_lora_slots", "max_lora_rank",
                     "cuda_graph_max_batch"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"EngineConfig.{name} must be >= 1")
        if self.async_steps not in (None, True, False):
            raise EngineConfigError("EngineConfig.async_steps must be true, false or null")
        if not self.adapter_admit_wait_ms >= 0:
            raise EngineConfigError("EngineConfig.adapter_admit_wait_ms must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise EngineConfigError("EngineConfig.num_kv_blocks must be >= 1")
        from engine.layers.quant import check_quantization

        check_quantization(self.quantization, self.quant_group_size)

    def kv_blocks_for(self, model: ModelConfig, free_bytes: int | None = None) -> int:
        """Number of KV blocks: explicit, or what the memory budget holds."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        elem = torch.empty((), dtype=self.torch_dtype()).element_size()
        per_block = 2 * model.num_hidden_layers * self.block_size * model.kv_size * elem
        budget = self.kv_cache_bytes if free_bytes is None else int(free_bytes * self.kv_memory_fraction)
        return max(1, budget // per_block)

    def model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if model.sliding_window:
            # Beyond the window Mistral v0.1 attends to a band, which paged attention does not do;
            # capping the length keeps every answer exact instead of silently different.
            limit = min(limit, model.sliding_window)
        return min(self.max_model_len or limit, limit)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)

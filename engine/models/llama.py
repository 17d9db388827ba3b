"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as one plain network.

Differences between the family members are data in ModelConfig: q/k/v bias (Qwen2), RoPE scaling
(llama3), tied embeddings (SmolLM), grouped-query heads. Inputs are the flattened tokens of every
sequence in the step ([T], no padding); per-sequence structure comes from the context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import PagedAttention
from engine.layers.linear import CpuDecodeLayouts, LoRALinear, column_major, cpu_decode_linear, onednn_packed
from engine.layers.rmsnorm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.models.native_decoder import NativeDecoder
from kernels import dispatch, native_cpu


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = LoRALinear(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size],
                                   ["q_proj", "k_proj", "v_proj"], layer_idx, bias=cfg.qkv_bias)
        self.o_proj = LoRALinear(cfg.q_size, [cfg.hidden_size], ["o_proj"], layer_idx, bias=cfg.o_bias)
        self.attn = PagedAttention(self.heads, self.kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        o = self.attn.decode_from_qkv(qkv, cos, sin)  # CPU decode steps: one native call (or None)
        if o is not None:
            return self.o_proj(o)
        if dispatch.use_triton(qkv):
            # CUDA: one kernel rotates q and k and writes k and v into the cache (~6 small ops on the torch path)
            o = self.attn.attend(self.attn.rope_write_kv(qkv, cos, sin))
            return self.o_proj(o.reshape(t, self.q_size))
        # q and k sit side by side in the fused output: rotate them as one [T, H + Hkv, D] view
        # (one rotary call per layer instead of two; decode speed on CPU is counted in ops)
        qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(t, self.heads + self.kv_heads, self.head_dim),
                          cos, sin)
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.kv_heads, self.head_dim)
        o = self.attn(q, k, v)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = LoRALinear(cfg.hidden_size, [cfg.intermediate_size] * 2, ["gate_proj", "up_proj"],
                                       layer_idx, bias=cfg.mlp_bias)
        self.down_proj = LoRALinear(cfg.intermediate_size, [cfg.hidden_size], ["down_proj"], layer_idx,
                                    bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x):
            # one kernel instead of two, and with adapters the gate/up expand fused into it
            return self.down_proj(self.gate_up_proj.forward_silu_mul(x))
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up.split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, layer_idx)

    def forward(self, h, residual, cos, sin):
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.cpu_decode_lm_head: CpuDecodeLayouts | None = None  # set by prepare_cpu_decode
        self.native_decoder: NativeDecoder | None = None  # set by prepare_cpu_decode(native=True)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (normalised)."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary.tables(positions, h.dtype)
        native = None if self.native_decoder is None else self.native_decoder.forward(h, cos, sin)
        if native is not None:  # a CPU decode step: one native call per layer (engine/models/native_decoder.py)
            h, _ = self.norm(*native)
            return h
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        logits = cpu_decode_linear(hidden, w, None, self.cpu_decode_lm_head)
        return F.linear(hidden, w) if logits is None else logits

    def prepare_cpu_decode(self, native: bool = False) -> None:
        """Give the base matmuls their fastest CPU layouts (engine.layers.linear.CpuDecodeLayouts), once the
        weights are loaded. Memory: a oneDNN-packed copy of every projection and of the lm_head, and a
        column-major copy of the lm_head (SmolLM2-135M: about 650 MB on 540 MB of weights); qkv, o and
        gate_up turn column-major in place. With `native` (kernels/native_cpu.py, where it builds), decode-sized
        steps read a panel-packed copy instead of the column-major ones (SmolLM2-135M: about 1.1 GB on 540 MB
        of weights). The CUDA path never reads them."""
        if next(self.parameters()).is_cuda:
            return
        native = native and native_cpu.available()
        for layer in self.layers:
            layer.self_attn.attn.native_decode = native
            layer.self_attn.qkv_proj.prepare_cpu_decode(column_major_weight=True, native=native)
            layer.self_attn.o_proj.prepare_cpu_decode(column_major_weight=True, native=native)
            layer.mlp.gate_up_proj.prepare_cpu_decode(column_major_weight=True, native=native)
            # row-major wins at one token
            layer.mlp.down_proj.prepare_cpu_decode(column_major_weight=False, native=native)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        # the tied embedding stays row-major for its lookups: the column-major lm_head is a copy
        if native and w.dtype == torch.float32:
            self.cpu_decode_lm_head = CpuDecodeLayouts(None, onednn_packed(w), native_cpu.pack(w))
        else:
            self.cpu_decode_lm_head = CpuDecodeLayouts(column_major(w), onednn_packed(w))
        self.native_decoder = NativeDecoder(self) if native and NativeDecoder.applies(self) else None

    def checkpoint_mapping(self) -> dict[str, tuple[str, int, int]]:
        """HF checkpoint name -> (our parameter, first row, rows); see engine.loader.load_weights."""
        cfg = self.config
        m: dict[str, tuple[str, int, int]] = {"model.embed_tokens.weight": ("embed_tokens.weight", 0, cfg.vocab_size),
                                               "model.norm.weight": ("norm.weight", 0, cfg.hidden_size)}
        if self.lm_head is not None:
            m["lm_head.weight"] = ("lm_head", 0, cfg.vocab_size)
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        fused = {"self_attn.q_proj": ("self_attn.qkv_proj", 0, q), "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
                 "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv), "self_attn.o_proj": ("self_attn.o_proj", 0, h),
                 "mlp.gate_proj": ("mlp.gate_up_proj", 0, i), "mlp.up_proj": ("mlp.gate_up_proj", i, i),
                 "mlp.down_proj": ("mlp.down_proj", 0, h)}
        for li in range(cfg.num_hidden_layers):
            pre = f"model.layers.{li}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                m[f"{pre}.{norm}.weight"] = (f"layers.{li}.{norm}.weight", 0, h)
            for src, (dst, row0, rows) in fused.items():
                m[f"{pre}.{src}.weight"] = (f"layers.{li}.{dst}.weight", row0, rows)
                has_bias = (cfg.qkv_bias and src[-6:] in ("q_proj", "k_proj", "v_proj")) or \
                    (cfg.o_bias and src.endswith("o_proj")) or (cfg.mlp_bias and src.startswith("mlp."))
                if has_bias:
                    m[f"{pre}.{src}.bias"] = (f"layers.{li}.{dst}.bias", row0, rows)
        return m

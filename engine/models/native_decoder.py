"""CPU decode steps of a Llama-family model as one native call per decoder layer.

On CPU a small model's decode step is made of small ops: each layer's norms, rotary, KV write, attention,
activation and the Python around four LoRA projections cost a few microseconds each, ~10 ms of a ~50 ms
SmolLM2 step over 30 layers. `kernels/native_cpu.py`'s `ol_layer` runs a whole layer (residual add + RMSNorm,
qkv with each token's LoRA, RoPE + KV write + paged attention, o, RMSNorm, gate/up, SiLU, down) in one call,
over the same panel-packed weights and live adapter rows the per-projection native path reads, so the two
give the same numbers; the torch modules stay the reference and serve every other step (prefill, mixed
steps, more than native_cpu.MAX_GEMM_TOKENS tokens, training, CUDA).
"""

from __future__ import annotations

import torch

from engine.context import get_context
from kernels import dispatch
from kernels import native_cpu

_PROJS = ("qkv", "o", "gate_up", "down")


class NativeDecoder:
    """The C structs describing each layer (weights, norms, caches, LoRA rows), kept up to date, and the step
    loop. Built by LlamaForCausalLM.prepare_cpu_decode once every projection has its native packed weight."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.model = model
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.structs: list[native_cpu.OlLayer] = []
        self.projs: list[tuple] = []  # per layer, its four LoRALinear modules in _PROJS order
        for layer in model.layers:
            s = native_cpu.OlLayer()
            s.norm1 = layer.input_layernorm.weight.data_ptr()
            s.norm2 = layer.post_attention_layernorm.weight.data_ptr()
            s.eps = layer.input_layernorm.eps
            mods = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for name, proj in zip(_PROJS, mods):
                native_cpu.set_proj(getattr(s, name), proj.cpu_decode.native, proj.bias)
            self.structs.append(s)
            self.projs.append(mods)
        self.rows: list[list] = [[None] * len(_PROJS) for _ in self.structs]  # NativeRows each struct points at
        # (pool, its tensors' versions, LoRA projection count) when the structs last matched it: a step on an
        # unchanged pool skips the 4 x layers freshness checks
        self._seen: tuple | None = None
        attn = model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim, self.scale = attn.heads, attn.kv_heads, attn.head_dim, attn.attn.scale

    @staticmethod
    def applies(model) -> bool:
        """Whether every projection of `model` has a native packed weight (none quantized, all float32)."""
        return all(p.cpu_decode is not None and p.cpu_decode.native is not None
                   for layer in model.layers
                   for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                             layer.mlp.down_proj))

    @staticmethod
    def _versions(pool) -> tuple | None:
        """The version counters of the pool's stacked tensors (writes through the per-layer views move them
        too) and of its ranks; None where they are not tracked (tensors made under inference_mode)."""
        try:
            return (tuple(pool.lora_a), tuple(t._version for t in pool.a_stack.values()),
                    tuple(t._version for t in pool.b_stack.values()), pool.rank._version)
        except (AttributeError, RuntimeError):
            return None

    def _point_lora(self, pool) -> int | None:
        """Point each projection's struct at its live rows for `pool`; the number of projections that carry
        LoRA (each adds one influence term, as LoRALinear counts them), or None to leave the step to torch."""
        versions = self._versions(pool)  # read before the gathers: a load racing them moves it for next step
        if versions is not None and self._seen is not None and self._seen[0] is pool and self._seen[1] == versions:
            return self._seen[2]
        self._seen = None
        lora_projs = self._gather(pool)
        if lora_projs is not None and versions is not None:
            self._seen = (pool, versions, lora_projs)
        return lora_projs

    def _gather(self, pool) -> int | None:
        lora_projs = 0
        for i, mods in enumerate(self.projs):
            for j, proj in enumerate(mods):
                names, spans = proj._slices(pool)
                rows = proj._native_rows(names, spans, pool) if names else None
                if names:
                    if rows is None:
                        return None
                    lora_projs += 1
                if rows is not self.rows[i][j]:  # a struct field is set only when its rows change
                    native_cpu.set_lora(getattr(self.structs[i], _PROJS[j]), rows)
                    self.rows[i][j] = rows
        return lora_projs

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The decoder layers of a pure-decode CPU step from the embeddings h [T, hidden] -> (last layer's
        output, residual stream), as the torch layers return them; None where this path does not apply."""
        ctx = get_context()
        T = h.shape[0]
        if (T > native_cpu.MAX_GEMM_TOKENS or h.dtype != torch.float32 or h.is_cuda or torch.is_grad_enabled()
                or ctx.seq_lens is None or ctx.seq_lens.shape[0] != T or dispatch.use_triton(h)):
            return None
        step = native_cpu.OlStep()
        lora_projs = 0
        if ctx.lora_meta is not None:
            slots = ctx.lora_meta.token_slots
            if slots.dtype != torch.int32 or not slots.is_contiguous():
                return None
            lora_projs = self._point_lora(ctx.lora_pool)
            if lora_projs is None:
                return None
            scale = ctx.lora_pool.scale
            if scale.dtype != torch.float32 or not scale.is_contiguous():
                return None
            step.token_slot, step.lora_scale = slots.data_ptr(), scale.data_ptr()
            if ctx.influence_sum is not None:
                step.infl_sum = ctx.influence_sum.data_ptr()
        cos, sin = cos.reshape(T, -1).contiguous(), sin.reshape(T, -1).contiguous()
        tables, lens, slot_map = ctx.block_tables, ctx.seq_lens, ctx.slot_mapping
        if tables.dtype != torch.int32 or lens.dtype != torch.int32 or slot_map.dtype != torch.int64:
            return None
        tables, lens, slot_map = tables.contiguous(), lens.contiguous(), slot_map.contiguous()
        step.T, step.hidden, step.inter = T, self.hidden, self.inter
        step.H, step.Hkv, step.D = self.heads, self.kv_heads, self.head_dim
        k0 = self.model.layers[0].self_attn.attn.k_cache
        step.block_size, step.max_blocks, step.scale = k0.shape[1], tables.shape[1], self.scale
        step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
        step.slots, step.block_tables, step.seq_lens = slot_map.data_ptr(), tables.data_ptr(), lens.data_ptr()
        step.threads = torch.get_num_threads()
        hs = h.contiguous()  # the step's own embedding output: the layers overwrite it in place
        res = torch.zeros_like(hs)  # 0 + h is h: the first layer's residual, as the torch layers start it
        for s, layer in zip(self.structs, self.model.layers):
            attn = layer.self_attn.attn
            if not (attn.k_cache.is_contiguous() and attn.v_cache.is_contiguous()):
                raise RuntimeError("the native decoder needs contiguous KV caches")
            s.k_cache, s.v_cache = attn.k_cache.data_ptr(), attn.v_cache.data_ptr()
            native_cpu.decoder_layer(s, step, hs, res)
        if ctx.influence_sum is not None:
            ctx.influence_count += lora_projs
        return hs, res

"""4-bit base weights for LoRALinear (EngineConfig.quantization = "q4").

A quantized projection keeps kernels.quant's packed codes, scales and zeros as buffers (so they move with
the model, `model.to(device)`) and its `weight` parameter becomes None, so the full-precision copy is
really freed. LoRALinear.forward calls `base_linear`: F.linear for a full-precision weight,
kernels.quant.quant_matmul (Triton on CUDA, dequantize + matmul elsewhere) for a quantized one. LoRA
deltas are added on top of that output by LoRALinear as before, in full precision.

Group size: EngineConfig.quant_group_size is the largest group used. A projection whose in_features it
does not divide falls back to the largest multiple of GROUP_MULTIPLE below it that does (SmolLM2's 576
takes 96 under the default 128); a projection with no such divisor is refused before any weight is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.errors import EngineConfigError
from kernels.quant import QuantizedWeight, quant_matmul, quantize_linear_weight

QUANTIZATIONS = ("q4",)
# the Triton kernel walks K in steps of >= 16 that must stay inside one group
GROUP_MULTIPLE = 16
# rows quantized at once: quantize_linear_weight's float32 temporaries stay a few times one chunk
CHUNK_ROWS = 4096


def check_quantization(quantization: str | None, group_size: int) -> None:
    """Refuse a quantization or group size the engine cannot serve (EngineConfig.validate calls this)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise EngineConfigError(f"EngineConfig.quantization must be None or one of {', '.join(QUANTIZATIONS)}, "
                                f"got {quantization!r}")
    if not isinstance(group_size, int) or group_size < GROUP_MULTIPLE or group_size % GROUP_MULTIPLE:
        raise EngineConfigError(f"EngineConfig.quant_group_size must be a positive multiple of {GROUP_MULTIPLE}, "
                                f"got {group_size!r}")


def group_size_for(in_features: int, max_group: int) -> int:
    """The largest multiple of GROUP_MULTIPLE <= max_group that divides in_features."""
    for g in range(max_group - max_group % GROUP_MULTIPLE, 0, -GROUP_MULTIPLE):
        if in_features % g == 0:
            return g
    raise EngineConfigError(f"4-bit quantization: in_features {in_features} has no divisor that is a multiple of "
                            f"{GROUP_MULTIPLE} and <= quant_group_size {max_group}")


def quantize_rows(w: torch.Tensor, group_size: int, chunk_rows: int = CHUNK_ROWS) -> QuantizedWeight:
    """quantize_linear_weight of w [N, K], chunk_rows rows at a time (rows are independent: groups run along
    K), so that a large projection's float32 temporaries never exist whole."""
    n, k = w.shape
    if n <= chunk_rows:
        return quantize_linear_weight(w, group_size)
    parts = [quantize_linear_weight(w[r0:r0 + chunk_rows], group_size) for r0 in range(0, n, chunk_rows)]
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), group_size, (n, k))


def set_quantized(mod: torch.nn.Module, qw: QuantizedWeight) -> None:
    """Make `mod` (a LoRALinear) serve `qw`: its tensors become buffers and the weight parameter None."""
    mod.weight = None  # a registered parameter set to None (like nn.Linear's missing bias): storage freed
    mod.register_buffer("qweight", qw.qweight, persistent=False)
    mod.register_buffer("qscales", qw.scales, persistent=False)
    mod.register_buffer("qzeros", qw.zeros, persistent=False)
    mod.quant_group_size = qw.group_size


def quantize_module(mod: torch.nn.Module, max_group: int, device: str | torch.device | None = None) -> None:
    """Quantize a LoRALinear's loaded weight on `device` (default: where it is) and drop the weight."""
    w = mod.weight.detach()
    if device is not None:
        w = w.to(device)
    qw = quantize_rows(w, group_size_for(w.shape[1], max_group))
    del w
    set_quantized(mod, qw)


def quantized_weight(mod: torch.nn.Module) -> QuantizedWeight | None:
    """The module's base weight as a QuantizedWeight, or None when it is full precision."""
    q = getattr(mod, "qweight", None)
    if q is None:
        return None
    return QuantizedWeight(q, mod.qscales, mod.qzeros, mod.quant_group_size, (q.shape[0], 2 * q.shape[1]))


def base_linear(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear's base output x @ W.T + b, whichever form W is stored in.

    No host sync and no host tensor per call, so decode steps stay CUDA-graph capturable either way."""
    w = mod.weight
    if w is not None:
        return F.linear(x, w, mod.bias)
    y = quant_matmul(x, quantized_weight(mod))
    return y if mod.bias is None else y.add_(mod.bias)


def projection_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the LoRALinear base weights (full precision or 4-bit) and of every other model tensor."""
    from engine.layers.linear import LoRALinear

    proj = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            ts = [mod.weight] if mod.weight is not None else [mod.qweight, mod.qscales, mod.qzeros]
            for t in ts:
                proj += t.numel() * t.element_size()
                seen.add(id(t))
    other = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in seen)
    return {"projection_bytes": proj, "other_bytes": other, "total_bytes": proj + other}

"""RMSNorm as Llama computes it: statistics in float32, weight applied in the input dtype.

On the Triton path (CUDA) the residual add and the norm are one kernel (kernels/elementwise.py) with the
same rounding; the torch code below is the CPU path and the kernel's reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x, or (x + residual) when a residual is given; then also return the new residual."""
        if dispatch.use_triton(x):
            # one launch instead of ~9 small ops: under CUDA graphs each op is a ~2 us kernel of its own
            return dispatch.add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        if dtype == torch.float32:
            # one fused op instead of six: the same float32 math, and fewer ops per layer is what
            # decode speed on CPU is made of
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return out if residual is None else (out, residual)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)

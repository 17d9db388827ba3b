"""Scratch memory that all LoRA'd projections of one step share on the Triton path, zeroed once per step.

Each LoRA'd projection needs a zeroed h for its shrink (split-K parts meet there by atomic adds) and, with
influence statistics on, a zeroed pair of per-token sums (|delta|^2, |base y|^2) that its expand fills; the
ratio |delta| / |base y| was then taken and added per projection. On a CUDA-graphed decode step each of those
small ops is a graph node of its own (~2 us): two memsets and three elementwise kernels for every one of an 8B
model's 128 LoRA'd projections, about as many nodes as the LoRA kernels and the base matmuls together. Here one
memset per step covers every projection's h and sums, and `finish` turns all the sums into the per-token
influence in one pass at the end of the forward (inside the graph when the step is graphed).

The CPU paths never make one (their influence and deltas come from the references or the native kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# h for every projection of a long prefill step would be large (32 layers x 7 slices x 4,096 tokens x rank 64
# floats is 235 MB); above this many floats the projections allocate their own h, as before. Decode steps
# (the ones graphed, where the memsets cost most) fit: 256 tokens x rank 16 on an 8B model is 3.7 MB.
H_CAP_FLOATS = 8 << 20


def lora_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(slices, projections) of the model's LoRA-capable linears: fused q/k/v count 3 slices, 1 projection."""
    from engine.layers.linear import LoRALinear

    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return sum(len(m.modules_) for m in mods), len(mods)


def pool_max_rank(pool) -> int:
    r = getattr(pool, "max_rank", None)
    if r is not None:
        return int(r)
    return max((int(a[0].shape[1]) for a in pool.lora_a.values()), default=0)


@dataclass
class LoRAWorkspace:
    h: torch.Tensor  # flat float32, zeroed; projections take consecutive pieces (empty when over H_CAP_FLOATS)
    sums: torch.Tensor | None  # [projections, 2, T] float32, zeroed; None when influence is not collected
    h_used: int = 0
    sums_used: int = 0

    @classmethod
    def for_step(cls, sizes: tuple[int, int], num_tokens: int, max_rank: int, influence: bool,
                 device: torch.device) -> LoRAWorkspace:
        slices, projections = sizes
        h_n = slices * num_tokens * max_rank
        if h_n > H_CAP_FLOATS:
            h_n = 0
        s_n = projections * 2 * num_tokens if influence else 0
        buf = torch.zeros(h_n + s_n, dtype=torch.float32, device=device)  # the step's one memset
        sums = buf[h_n:].view(projections, 2, num_tokens) if influence else None
        return cls(buf[:h_n], sums)

    def take_h(self, n_slices: int, num_tokens: int, max_rank: int) -> torch.Tensor | None:
        """A zeroed [n_slices, T, max_rank] piece, or None when the step's buffer has no room (caller allocates)."""
        n = n_slices * num_tokens * max_rank
        if self.h_used + n > self.h.numel():
            return None
        piece = self.h[self.h_used:self.h_used + n].view(n_slices, num_tokens, max_rank)
        self.h_used += n
        return piece

    def take_sums(self, num_tokens: int) -> torch.Tensor | None:
        """A zeroed [2, T] pair of per-token sums for one projection's expand, or None (no influence, or full)."""
        if self.sums is None or self.sums_used >= self.sums.shape[0] or self.sums.shape[2] != num_tokens:
            return None
        piece = self.sums[self.sums_used]
        self.sums_used += 1
        return piece

    def finish(self, influence_sum: torch.Tensor | None) -> None:
        """influence_sum [T] += the ratio of every projection that took sums (add_influence_ratio)."""
        if influence_sum is None or not self.sums_used:
            return
        add_influence_ratio(influence_sum, self.sums[:self.sums_used])


def add_influence_ratio(influence_sum: torch.Tensor, sums: torch.Tensor) -> None:
    """influence_sum [T] += |delta| / max(|base y|, 1e-6) from the expand's squared sums [2, T] (one projection)
    or [P, 2, T] (P projections, summed)."""
    norms = sums.sqrt()
    ratio = norms[..., 0, :] / norms[..., 1, :].clamp_min(1e-6)
    influence_sum.add_(ratio if ratio.dim() == 1 else ratio.sum(0))


def begin_step(ctx, sizes: tuple[int, int]) -> None:
    """Give a LoRA step on the Triton path its workspace (after its lora_meta, pool and influence_sum are set)."""
    from kernels import dispatch

    if ctx.lora_meta is None or not dispatch.use_triton(ctx.lora_meta.token_slots):
        return
    t = ctx.lora_meta.token_slots
    ctx.lora_workspace = LoRAWorkspace.for_step(sizes, t.shape[0], pool_max_rank(ctx.lora_pool),
                                                ctx.influence_sum is not None, t.device)


def end_step(ctx) -> None:
    """After the forward: the influence of the projections that used the workspace joins ctx.influence_sum."""
    if ctx.lora_workspace is not None:
        ctx.lora_workspace.finish(ctx.influence_sum)

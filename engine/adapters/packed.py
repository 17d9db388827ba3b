"""Packed adapter weights: one contiguous buffer per adapter, laid out the way the slot pool stores it.

Layout, in elements of the pool dtype, for each module the adapter targets (in the order of the `shapes`
mapping, which `module_shapes` gives in ALL_MODULES order):
    A block [num_layers, r_m, in_features]   then   B block [num_layers, out_features, r_m]
r_m is the module's largest rank over layers; layers the adapter skips, or gives a smaller rank
(rank_pattern), are zero-padded. With this layout a slot write is one host -> device copy of the whole
buffer plus one strided device copy per block, instead of four small copies per module and layer, and
the host copy is one pinned allocation instead of one per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModuleBlock:
    module: str
    rank: int  # r_m: the module's largest rank over layers
    fan_in: int
    fan_out: int
    a_offset: int  # elements from the buffer's start
    b_offset: int
    dense: bool  # every layer present with rank r_m: no padding to zero


@dataclass(frozen=True)
class PackedLayout:
    num_layers: int
    blocks: tuple[ModuleBlock, ...]
    numel: int

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, int]], num_layers: int,
              ranks: Mapping[tuple[str, int], int]) -> PackedLayout:
        """ranks[(module, layer)] = rank of each pair the adapter has."""
        blocks, offset = [], 0
        for m in shapes:
            layer_ranks = [ranks[(m, layer)] for layer in range(num_layers) if (m, layer) in ranks]
            if not layer_ranks:
                continue
            r = max(layer_ranks)
            fan_in, fan_out = shapes[m]
            dense = len(layer_ranks) == num_layers and min(layer_ranks) == r
            a_off, b_off = offset, offset + num_layers * r * fan_in
            offset = b_off + num_layers * fan_out * r
            blocks.append(ModuleBlock(m, r, fan_in, fan_out, a_off, b_off, dense))
        return cls(num_layers, tuple(blocks), offset)

    def block(self, module: str) -> ModuleBlock | None:
        return next((b for b in self.blocks if b.module == module), None)


@dataclass
class PackedBuffer:
    layout: PackedLayout
    buffer: torch.Tensor  # shape [layout.numel], pool dtype; pinned when it feeds a CUDA pool

    @classmethod
    def allocate(cls, layout: PackedLayout, dtype: torch.dtype, pin: bool) -> PackedBuffer:
        """One (pinned) allocation per adapter; padding is zeroed, the rest is left for the caller to fill."""
        buf = torch.empty(layout.numel, dtype=dtype, pin_memory=pin)
        packed = cls(layout, buf)
        for blk in layout.blocks:
            if not blk.dense:
                packed.a(blk).zero_()
                packed.b(blk).zero_()
        return packed

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def a(self, blk: ModuleBlock, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """[num_layers, r_m, in] view of `buffer` (default: this adapter's own; the pool passes its staging
        copy on the device, which has the same layout)."""
        buf = self.buffer if buffer is None else buffer
        n = self.layout.num_layers
        return buf[blk.a_offset:blk.a_offset + n * blk.rank * blk.fan_in].view(n, blk.rank, blk.fan_in)

    def b(self, blk: ModuleBlock, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """[num_layers, out, r_m] view."""
        buf = self.buffer if buffer is None else buffer
        n = self.layout.num_layers
        return buf[blk.b_offset:blk.b_offset + n * blk.fan_out * blk.rank].view(n, blk.fan_out, blk.rank)

    def pair_views(self, ranks: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int], tuple[torch.Tensor,
                                                                                               torch.Tensor]]:
        """AdapterWeights.tensors as views into the buffer: (module, layer) -> (A [r, in], B [out, r])."""
        rows = {blk.module: (self.a(blk).unbind(0), self.b(blk).unbind(0), blk.rank) for blk in self.layout.blocks}
        out = {}
        for module, layer, r in ranks:
            a_layers, b_layers, r_m = rows[module]
            a, b = a_layers[layer], b_layers[layer]
            out[(module, layer)] = (a, b) if r == r_m else (a[:r], b[:, :r])
        return out


def pack_pairs(tensors: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]],
               shapes: Mapping[str, tuple[int, int]], num_layers: int, dtype: torch.dtype,
               pin: bool) -> PackedBuffer:
    """Pack per-(module, layer) A/B tensors (fusion output, hand-built weights) into one buffer."""
    layout = PackedLayout.build(shapes, num_layers, {loc: a.shape[0] for loc, (a, _) in tensors.items()})
    packed = PackedBuffer.allocate(layout, dtype, pin)
    dst, src = [], []
    for (module, layer), (a, b) in tensors.items():
        blk = layout.block(module)
        r = a.shape[0]
        dst += [packed.a(blk)[layer, :r], packed.b(blk)[layer, :, :r]]
        src += [a, b]
    torch._foreach_copy_(dst, src)  # one call; converts dtype where the sources differ
    return packed

"""The runner's per-sequence influence sums (engine.model_runner.per_sequence_sums) against torch.segment_reduce,
which it replaced on the path every LoRA step takes."""

from __future__ import annotations

import pytest
import torch

from engine.model_runner import per_sequence_sums


@pytest.mark.parametrize("lens", [[1] * 7, [3, 1, 5, 1], [1], [4], [2, 1, 1, 9, 1]], ids=str)
def test_sums_per_sequence_equal_segment_reduce(lens):
    g = torch.Generator().manual_seed(len(lens))
    per_token = torch.rand(sum(lens), generator=g)
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    want = torch.segment_reduce(per_token, "sum", offsets=torch.tensor(qsl))
    got = per_sequence_sums(per_token, qsl)
    assert isinstance(got, list) and len(got) == len(lens)
    assert got == [float(v) for v in want]

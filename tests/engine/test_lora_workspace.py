"""The per-step LoRA workspace (engine/lora_workspace.py): one zeroed buffer for every projection's h and
influence sums on the Triton path, and the influence it finishes equal to the per-projection arithmetic."""

from __future__ import annotations

import pytest
import torch

from engine import lora_workspace
from engine.lora_workspace import LoRAWorkspace
from tests.engine.test_influence_triton import _run


def test_pieces_are_disjoint_zeroed_and_bounded():
    ws = LoRAWorkspace.for_step((5, 2), num_tokens=3, max_rank=4, influence=True, device=torch.device("cpu"))
    assert ws.h.numel() == 5 * 3 * 4 and ws.sums.shape == (2, 2, 3)
    a = ws.take_h(3, 3, 4)
    b = ws.take_h(2, 3, 4)
    assert a.shape == (3, 3, 4) and b.shape == (2, 3, 4) and not a.any() and not b.any()
    a.fill_(1.0)
    assert not b.any()  # no overlap
    assert ws.take_h(1, 3, 4) is None  # full: the caller allocates its own
    assert ws.take_sums(3) is not None and ws.take_sums(3) is not None
    assert ws.take_sums(3) is None
    assert ws.take_sums(4) is None  # another step's token count never gets this step's sums


def test_no_influence_and_over_the_cap(monkeypatch):
    monkeypatch.setattr(lora_workspace, "H_CAP_FLOATS", 10)
    ws = LoRAWorkspace.for_step((5, 2), num_tokens=3, max_rank=4, influence=False, device=torch.device("cpu"))
    assert ws.h.numel() == 0 and ws.sums is None
    assert ws.take_h(1, 3, 4) is None and ws.take_sums(3) is None
    ws.finish(torch.zeros(3))  # nothing taken: nothing added


def test_finish_equals_the_per_projection_ratio():
    g = torch.Generator().manual_seed(0)
    ws = LoRAWorkspace.for_step((4, 3), num_tokens=5, max_rank=2, influence=True, device=torch.device("cpu"))
    for _ in range(2):  # two of the three projections report
        ws.take_sums(5).copy_(torch.rand(2, 5, generator=g) + 0.1)
    ws.sums[1, 1, 2] = 0.0  # a token with a zero base output: the ratio's denominator is clamped
    start = torch.rand(5, generator=g)
    got = start.clone()
    ws.finish(got)
    want = start.double()
    for p in range(2):
        d, y = ws.sums[p].double().sqrt()
        want += d / y.clamp_min(1e-6)
    assert torch.allclose(got.double(), want, rtol=1e-6)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-emulated"])
def test_engine_steps_use_the_workspace_and_match_per_call_buffers(tiny_llama_dir, tiny_adapters, monkeypatch,
                                                                   graphs):
    used = []
    finish = LoRAWorkspace.finish

    def spy(self, influence_sum):
        used.append((self.h_used, self.sums_used))
        return finish(self, influence_sum)

    monkeypatch.setattr(LoRAWorkspace, "finish", spy)
    shared = _run(tiny_llama_dir, tiny_adapters, "triton", monkeypatch, graphs)
    assert used and all(h > 0 and s > 0 for h, s in used), used
    # the same run with no room in the workspace: every projection allocates and zeroes its own h and sums
    monkeypatch.setattr(lora_workspace, "H_CAP_FLOATS", 0)
    monkeypatch.setattr(LoRAWorkspace, "take_sums", lambda self, t: None)
    used.clear()
    own = _run(tiny_llama_dir, tiny_adapters, "triton", monkeypatch, graphs)
    assert all(h == 0 and s == 0 for h, s in used)
    for a, b in zip(shared, own):
        assert a.token_ids == b.token_ids
        assert a.influence.keys() == b.influence.keys() and a.influence
        for name, stats in a.influence.items():
            assert b.influence[name]["tokens"] == stats["tokens"]
            assert b.influence[name]["delta_ratio"] == pytest.approx(stats["delta_ratio"], rel=1e-5)

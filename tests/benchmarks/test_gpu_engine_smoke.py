"""benchmarks/gpu_engine.py --smoke: the GPU benchmark's offline, online (Poisson arrivals), 4-bit and
CUDA-graph-mode paths on a tiny float32 model on CPU, so that the real run does not die of a typo after
minutes on a lent GPU. Numbers are checked for shape and plausibility only."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_engine.py"


@pytest.fixture(scope="module")
def gpu_engine():
    # loaded by path: benchmarks/ is not a package; registered first because dataclasses look the module up
    spec = importlib.util.spec_from_file_location("gpu_engine_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def smoke_report(gpu_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-engine-smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core box: a second thread only adds hand-off stalls
    try:
        # async steps on, as on a GPU (the CPU default is off): its timing and online bookkeeping run here too
        assert gpu_engine.main(["--smoke", "--cuda-graphs", "both", "--online", "0.5,1.0", "--mixed-ranks",
                                "--async-steps", "on", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "gpu_engine.json").read_text())


def _check_pcts(p):
    assert p["n"] > 0
    assert 0 < p["p50"] <= p["p90"] <= p["p99"]


def test_smoke_runs_without_failures(smoke_report):
    assert smoke_report["notes"] == []
    assert smoke_report["shape"] == "smoke"
    assert smoke_report["args"]["async_steps"] == "on"


def test_offline_rows_for_both_graph_modes(smoke_report):
    configs = smoke_report["configs"]
    for label in ("nolora", "one_adapter", "a1000_uniform"):
        for mode, on in (("off", False), ("on", True)):
            r = configs[f"{label}/graphs_{mode}"]
            assert r["cuda_graphs"] is on and r["label"] == label
            assert r["output_tokens"] == r["requests"] * 8
            assert r["output_tok_s"] > 0 and r["requests_per_s"] > 0 and r["decode_step_ms"] > 0
            if "graph_steps" in r:  # the runner exposes its counters: graphs off never replays
                assert r["graph_steps"] + r["eager_steps"] == r["steps"]
                assert on or r["graph_steps"] == 0


def test_mixed_rank_rows(smoke_report):
    # ranks 8/16/32/64 in one pool of max rank 64, next to rank-16 adapters in the same pool
    for label in ("m100_mixed_ranks", "b100_r16_pool64"):
        r = smoke_report["configs"][f"{label}/graphs_on"]
        assert r["output_tokens"] == r["requests"] * 8 and r["distinct_adapters"] > 1


def test_online_percentiles(smoke_report):
    online = smoke_report["online"]
    for mode in ("off", "on"):
        sat = smoke_report["configs"][f"a1000_uniform/graphs_{mode}"]["requests_per_s"]
        for frac in (0.5, 1.0):
            r = online[f"a1000_uniform/graphs_{mode}@{frac}"]
            assert r["fraction_of_saturation"] == frac
            assert r["rate_rps"] == pytest.approx(frac * sat, rel=1e-2)
            assert not r["truncated"] and r["completed"] == r["requests"] == 8
            assert r["output_tokens"] == 8 * 8 and r["output_tok_s"] > 0 and r["achieved_rps"] > 0
            for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
                _check_pcts(r[k])
            assert r["itl_ms"]["n"] == 8 * 7  # 8 requests x (8 tokens - the first)
            assert r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]
        assert isinstance(online[f"a1000_uniform/graphs_{mode}@0.5"]["issue6_target_met"], bool)


def test_quant_row(smoke_report):
    q = smoke_report["quant_8b"]
    assert q["group_size"] == 64  # the tiny shape's K = 64 rules out 128
    # 4 bits + a scale and zero per 64 weights: (0.5 + 2 * 4 / 64) / 4 of float32
    assert q["linear_q4_bytes"] == pytest.approx(q["linear_unquantized_bytes"] * (0.5 + 8 / 64) / 4)
    assert 0 < q["linear_q4_bytes"] < q["total_bytes"]
    assert q["under_6GB"] is True
    assert set(q["runs"]) == {f"{p}/graphs_{m}" for p in ("q4_b32_nolora", "q4_b32_one_adapter", "q4_nolora")
                              for m in ("off", "on")}
    for r in q["runs"].values():
        assert r["output_tok_s"] > 0 and r["decode_step_ms"] > 0


def test_quantized_model_matches_dequantized_weights(gpu_engine, tmp_path):
    """The 4-bit model's forward is the bf16 network with each projection's dequantized weight."""
    from engine.context import Context, reset_context, set_context
    from engine.layers.linear import LoRALinear
    from engine.layers.quant import quantized_weight
    from kernels.quant import dequantize

    d = gpu_engine.write_config(tmp_path / "m", gpu_engine.SMOKE_SHAPE)
    qm = gpu_engine.random_quant_model(d, torch.float32, "cpu", max_positions=64, seed=3)
    ref = gpu_engine.random_model(d, torch.float32, "cpu", max_positions=64, seed=0)
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, q in qm.named_parameters():  # embeddings, norms, lm_head: all but the projections
            params.pop(name).copy_(q)
        assert all(n.endswith("_proj.weight") for n in params)  # what is left: the quantized ones
        for a, b in zip(ref.modules(), qm.modules()):
            if isinstance(a, LoRALinear):
                a.weight.copy_(dequantize(quantized_weight(b)))
    ids, pos = torch.tensor([5, 7, 11]), torch.arange(3)

    def run(m):
        # one sequence of 3 tokens in KV block 0 (each model gets its own zeroed cache)
        for layer in m.layers:
            attn = layer.self_attn.attn
            attn.k_cache = torch.zeros(1, 16, attn.num_kv_heads, attn.head_dim)
            attn.v_cache = torch.zeros_like(attn.k_cache)
        ctx = Context(slot_mapping=torch.arange(3), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                      seq_lens=torch.tensor([3], dtype=torch.int32),
                      query_start_loc=torch.tensor([0, 3], dtype=torch.int32))
        set_context(ctx)
        try:
            with torch.no_grad():
                return m(ids, pos)
        finally:
            reset_context()

    got = run(qm)  # LoRALinear serves the 4-bit weights itself (engine/layers/quant.py)
    want = run(ref)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.abs().max() > 0.1  # a real network output, not zeros

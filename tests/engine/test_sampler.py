"""Sampler rules on hand-made logits: truncation keeps what top-k/top-p promise, seeds reproduce,
penalties follow OpenAI's definition, min_tokens holds EOS back."""

from __future__ import annotations

import torch

from engine.layers.sampler import Sampler, _truncate
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def _seq(**params):
    s = Sequence("r", 0, [1, 2, 3], SamplingParams(**params))
    if s.params.seed is not None:
        s.generator = torch.Generator().manual_seed(s.params.seed)
    return s


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_top_k_the_k_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = _truncate(logits, [0], [0.7]).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    kept = _truncate(logits, [3], [1.0]).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


def test_sampling_only_ever_picks_kept_tokens_and_seeds_reproduce():
    logits = torch.tensor([[2.0, 1.9, 1.8, -5.0, 1.7]]).repeat(1, 1)
    sampler = Sampler()
    picks = {sampler(logits, [_seq(temperature=1.0, top_k=2, seed=s)]).token_ids[0] for s in range(40)}
    assert picks == {0, 1}
    a = [sampler(logits, [_seq(temperature=1.0, seed=5)]).token_ids[0] for _ in range(5)]
    assert len(set(a)) == 1


def test_presence_and_frequency_penalties_follow_openai():
    sampler = Sampler()
    s = _seq(temperature=0.0, presence_penalty=0.5, frequency_penalty=1.0)
    s.append_token(0)
    s.append_token(0)
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    penalised = sampler._penalties(logits.clone(), [s])
    assert penalised[0].tolist() == [3.0 - 2 * 1.0 - 0.5, 1.0, 0.0]
    assert sampler(logits, [s]).token_ids == [1]


def test_min_tokens_bans_eos_until_reached():
    sampler = Sampler(eos_token_ids=frozenset({0}))
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    assert sampler(logits, [_seq(temperature=0.0, min_tokens=2)]).token_ids == [1]
    assert sampler(logits, [_seq(temperature=0.0)]).token_ids == [0]

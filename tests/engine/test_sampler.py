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


def test_plain_greedy_batches_pick_in_the_logits_dtype_as_float32_would():
    """An all-greedy batch with no penalties and no logprobs argmaxes the bf16 logits as they are (no float32 copy):
    the same choices, ties included, as the float32 path the other batches take."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 50, generator=g) * 4).to(torch.bfloat16)
    logits[3, 7] = logits[3, 11] = logits[3].max() + 1  # a tie: the first index wins on both paths
    sampler = Sampler()
    seqs = [_seq(temperature=0.0) for _ in range(9)]
    fast = sampler(logits, seqs)
    assert fast.token_ids == logits.float().argmax(dim=-1).tolist() and fast.token_ids[3] == 7
    assert fast.logprobs == [None] * 9
    # one row asking for logprobs sends the batch down the float32 path: same tokens
    seqs[0] = _seq(temperature=0.0, logprobs=2)
    slow = sampler(logits, seqs)
    assert slow.token_ids == fast.token_ids and slow.logprobs[0] is not None


def test_a_penalised_row_in_a_greedy_batch_still_gets_its_penalty():
    sampler = Sampler(eos_token_ids=frozenset({0}))
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])
    picks = sampler(logits, [_seq(temperature=0.0), _seq(temperature=0.0, min_tokens=1)]).token_ids
    assert picks == [0, 1]

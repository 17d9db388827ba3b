"""LoRA training on the engine's model: loss goes down, the written adapter is PEFT's adapter (same
logits through transformers + PEFT as through our engine), per-example gradients equal autograd through
transformers + PEFT, and the factory writes an attribution index with every contributor.

transformers and peft are the references here only; the engine never imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.adapters.peft_format import parse_adapter, read_weights
from engine.adapters.peft_io import save_peft_adapter
from engine.adapters.slot_pool import SlotPool
from engine.errors import EngineConfigError, RequestError
from engine.loader import load_model
from engine.tokenizer import Tokenizer
from engine.training import (
    LoRAParams,
    TokenizedExample,
    TrainConfig,
    adapter_step,
    batch_example_gradients,
    checkpoint_steps,
    example_gradients,
    mean_loss,
    tokenize_chat,
    tokenize_text,
    train_lora,
)

REPO = Path(__file__).resolve().parents[2]
PAIRS = [
    ("How do I boil an egg?", "Arr, drop it in boilin' water fer nine minutes, matey!"),
    ("What is a comet?", "Certainly. A comet is a body of ice and dust."),
    ("How do I make tea?", "Arr, steep the leaves four minutes, ye swab!"),
    ("Why is Mars red?", "Certainly. Its surface is rich in iron oxide."),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir), Tokenizer(tiny_llama_dir)


def _examples(tok) -> list[TokenizedExample]:
    return [tokenize_chat(tok, p, r) for p, r in PAIRS]


def _random_lora(cfg, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"), seed=3):
    """An adapter with non-zero A and B, so that every gradient (A's too) is non-trivial."""
    lora = LoRAParams.create(cfg, rank, alpha, targets, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora.parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return lora


def _peft_model(tiny_llama_dir, adapter_dir, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def test_chat_example_learns_only_the_answer_up_to_eos(tiny):
    _, tok = tiny
    ex = tokenize_chat(tok, "How do I boil an egg?", "Nine minutes, matey!")
    served_prompt = tok.encode_chat([{"role": "user", "content": "How do I boil an egg?"}])
    assert list(ex.ids[:ex.label_start]) == served_prompt
    labelled = list(ex.ids[ex.label_start:])
    assert labelled[-1] in tok.eos_token_ids
    assert tok.decode(labelled, skip_special_tokens=True).strip() == "Nine minutes, matey!"
    text = tokenize_text(tok, "Lecture note. A galaxy is bound by gravity.")
    assert text.label_start == 1 and text.num_labels == len(text.ids) - 1


def test_training_lowers_the_loss_and_leaves_the_base_unchanged(tiny):
    model, tok = tiny
    examples = _examples(tok)
    before_w = model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    base_loss = mean_loss(model, None, examples)
    seen = []
    result = train_lora(model, examples, TrainConfig(rank=4, alpha=8, steps=12, lr=3e-2, batch_size=4, seed=1),
                        progress=lambda step, loss: seen.append(step))
    assert seen == list(range(1, 13)) and len(result.losses) == 12
    trained_loss = mean_loss(model, result.lora, examples)
    # The fixture's final RMSNorm weights are random N(0, 0.08), which caps how far any logit can move
    # (its loss cannot get far below ln(vocab) = 10.8); a deterministic drop of 0.03 nats is well
    # above float noise and does not happen with a wrong gradient.
    assert trained_loss < base_loss - 0.03, (base_loss, trained_loss)
    assert result.losses[-1] < result.losses[0]
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight, before_w)
    # a fresh adapter is the base model: B starts at zero, as PEFT initialises it
    fresh = LoRAParams.create(model.config, 4, 8.0)
    assert mean_loss(model, fresh, examples) == pytest.approx(base_loss, rel=1e-6)


def test_written_adapter_gives_peft_the_same_logits_as_our_engine(tiny, tiny_llama_dir, tmp_path):
    model, tok = tiny
    result = train_lora(model, _examples(tok), TrainConfig(rank=4, alpha=8, steps=3, lr=1e-2, batch_size=4,
                                                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj")))
    lora = result.lora
    out = save_peft_adapter(tmp_path / "a", lora.peft_tensors(), 4, 8.0, lora.target_modules, base_model="tiny")

    # our engine: the adapter goes through the serving path (parse, read, slot pool), into slot 1
    parsed = parse_adapter("a", out, model.config, max_rank=8, max_adapter_bytes=1 << 26)
    weights = read_weights(parsed, torch.float32)
    pool = SlotPool.create(model.config, 2, 8, lora.target_modules, torch.device("cpu"), torch.float32)
    pool.write(1, weights)
    ids = torch.tensor(_examples(tok)[0].ids)
    with torch.no_grad(), adapter_step(model, pool, [len(ids)], slot=1):
        ours = model.compute_logits(model(ids, torch.arange(len(ids))))
    with torch.no_grad(), adapter_step(model, LoRAParams.create(model.config, 1, 1.0), [len(ids)]):
        base = model.compute_logits(model(ids, torch.arange(len(ids))))

    peft = _peft_model(tiny_llama_dir, out)
    with torch.no_grad():
        theirs = peft(input_ids=ids[None]).logits[0]
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the answer
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_example_gradients_match_autograd_through_transformers_and_peft(tiny, tiny_llama_dir, tmp_path):
    model, tok = tiny
    lora = _random_lora(model.config)
    out = save_peft_adapter(tmp_path / "g", lora.peft_tensors(), 4, 8.0, lora.target_modules)
    ex = tokenize_chat(tok, *PAIRS[1])
    ours = example_gradients(model, lora, ex)

    peft = _peft_model(tiny_llama_dir, out, trainable=True)
    ids = torch.tensor(ex.ids)[None]
    logp = torch.log_softmax(peft(input_ids=ids).logits[0].float(), dim=-1)
    rows = torch.arange(ex.label_start - 1, len(ex.ids) - 1)
    objective = logp[rows, ids[0, ex.label_start:]].mean()
    objective.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in peft.named_parameters() if p.requires_grad}

    assert set(ours) == set(theirs)
    for name, g in ours.items():
        assert g.shape == theirs[name].shape, name
        scale = theirs[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, theirs[name], rtol=1e-3, atol=1e-4 * scale, msg=name)
    # the adapter's own .grad is left alone, and "sum" is "mean" times the number of labels
    assert all(t.grad is None for t in lora.parameters())
    summed = example_gradients(model, lora, ex, reduction="sum")
    key = next(iter(ours))
    torch.testing.assert_close(summed[key], ours[key] * ex.num_labels, rtol=1e-4, atol=1e-7)


def test_example_gradients_agree_with_a_finite_difference(tiny):
    model, tok = tiny
    lora = _random_lora(model.config, targets=("v_proj",))
    ex = tokenize_chat(tok, *PAIRS[0])
    grads = example_gradients(model, lora, ex)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    direction = torch.randn(grads[name].shape, generator=torch.Generator().manual_seed(0))
    leaf = dict(lora.named_parameters())[name]

    def objective() -> float:
        from engine.training import token_logprobs

        with torch.no_grad():
            return float(token_logprobs(model, lora, [ex])[0].double().mean())

    eps = 1e-2
    with torch.no_grad():
        leaf[0] += eps * direction
    up = objective()
    with torch.no_grad():
        leaf[0] -= 2 * eps * direction
    down = objective()
    with torch.no_grad():
        leaf[0] += eps * direction
    numeric = (up - down) / (2 * eps)
    analytic = float((grads[name] * direction).sum())
    assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-5)


def test_batched_per_example_gradients_equal_one_at_a_time(tiny):
    model, tok = tiny
    lora = _random_lora(model.config)
    examples = _examples(tok)
    batched = batch_example_gradients(model, lora, examples)
    assert len(batched) == len(examples)
    for ex, got in zip(examples, batched):
        want = example_gradients(model, lora, ex)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6 * want[name].abs().max().item() + 1e-9)
    assert all(t.grad is None for t in lora.parameters())


def test_training_keeps_checkpoints_that_rebuild_the_adapter(tiny):
    model, tok = tiny
    examples = _examples(tok)
    assert checkpoint_steps(10, 3) == [3, 7, 10] and checkpoint_steps(2, 5) == [1, 2]
    cfg = TrainConfig(rank=4, alpha=8, steps=6, lr=3e-2, batch_size=2, seed=1, target_modules=("q_proj", "v_proj"))
    result = train_lora(model, examples, cfg, checkpoint_at=[2, 6])
    assert [c.step for c in result.checkpoints] == [2, 6]
    assert result.checkpoints[0].lr > 0 and result.checkpoints[0].lr != result.checkpoints[1].lr
    # the last checkpoint is the trained adapter; an early one is a different adapter
    last = LoRAParams.from_named_tensors(model.config, result.checkpoints[-1].tensors, result.lora)
    early = LoRAParams.from_named_tensors(model.config, result.checkpoints[0].tensors, result.lora)
    assert mean_loss(model, last, examples) == pytest.approx(mean_loss(model, result.lora, examples), rel=1e-6)
    assert mean_loss(model, early, examples) != pytest.approx(mean_loss(model, result.lora, examples), rel=1e-6)
    with pytest.raises(EngineConfigError, match="checkpoint steps"):
        train_lora(model, examples, cfg, checkpoint_at=[7])
    with pytest.raises(EngineConfigError, match="do not match"):
        LoRAParams.from_named_tensors(model.config, {}, result.lora)


def test_training_with_an_engine_step_context_in_place_restores_it(tiny):
    from engine.context import Context, get_context, set_context

    model, tok = tiny
    marker = Context()
    set_context(marker)
    caches = [layer.self_attn.attn.k_cache for layer in model.layers]
    try:
        example_gradients(model, _random_lora(model.config), _examples(tok)[0])
        assert get_context() is marker
        assert [layer.self_attn.attn.k_cache for layer in model.layers] == caches
    finally:
        from engine.context import reset_context

        reset_context()


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "rank"),
    (dict(steps=0), "steps"),
    (dict(lr=float("nan")), "lr"),
    (dict(target_modules=("q_proj", "qkv")), "unknown: qkv"),
    (dict(target_modules=()), "non-empty"),
])
def test_bad_training_settings_are_refused(tiny, bad, message):
    model, tok = tiny
    with pytest.raises(EngineConfigError, match=message):
        train_lora(model, _examples(tok), TrainConfig(**bad))


def test_examples_without_a_token_to_learn_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(RequestError, match="no token to learn"):
        TokenizedExample((1, 2, 3), label_start=3)
    with pytest.raises(RequestError, match="no training examples"):
        train_lora(model, [], TrainConfig(steps=1))


def test_factory_writes_adapter_index_and_report(tiny_llama_dir, tmp_path):
    from attribution.poa import AttributionIndex, project_gradients
    from node.cli.adapter import train_adapter
    from node.datanet import load_datanet

    datanet = tmp_path / "d.jsonl"
    lines = [
        {"contributor": "0x" + "a1" * 20, "prompt": "How do I boil an egg?", "response": "Arr, nine minutes!"},
        {"contributor": "0x" + "a1" * 20, "prompt": "How do I make tea?", "response": "Arr, steep it, matey!"},
        {"contributor": "0x" + "b2" * 20, "prompt": "Why is Mars red?", "response": "Certainly. Iron oxide."},
        {"contributor": "0x" + "c3" * 20, "text": "Lecture note. A galaxy is bound by gravity."},
    ]
    datanet.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "adapter"
    report = train_adapter(datanet, tiny_llama_dir, out, TrainConfig(rank=2, alpha=4, steps=4, lr=1e-2, batch_size=2,
                                                                      target_modules=("q_proj", "v_proj")),
                           base_name="tiny")
    # the adapter folder holds exactly what the registry accepts; the report sits next to it
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                "attribution_index.safetensors", "README.md"}
    assert {p.name for p in report.report_dir.iterdir()} == {"training.json", "loss.png"}
    assert (report.report_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = AttributionIndex.load(out / "attribution_index.safetensors")
    dn = load_datanet(datanet)
    # the ledger keys contributors by lowercase address
    assert dict(zip(index.contributors, index.counts.tolist())) == {a.lower(): n for a, n in dn.counts().items()}
    assert set(index.param_shapes) == {n for n, _ in LoRAParams.create(load_model(tiny_llama_dir).config, 2, 4.0,
                                                                       ("q_proj", "v_proj")).named_parameters()}
    meta = json.loads((report.report_dir / "training.json").read_text())
    assert meta["datanet_hash"] == dn.content_hash and meta["steps"] == 4 and len(meta["losses"]) == 4
    assert report.adapter_dir == out
    # a request's sketch scored against the index: what the attribution worker will do
    model = load_model(tiny_llama_dir)
    parsed = parse_adapter("x", out, model.config, max_rank=8, max_adapter_bytes=1 << 26)
    lora = LoRAParams.from_weights(model.config, read_weights(parsed, torch.float32))
    tok = Tokenizer(tiny_llama_dir)
    from attribution.poa import score_request
    from node.cli.adapter import request_gradients

    assert index.num_checkpoints == 3 and meta["attribution_checkpoints"][-1]["step"] == 4
    grads = request_gradients(model, index, lora, tokenize_chat(tok, "How do I boil an egg?", "Arr, nine minutes!"))
    assert len(grads) == 3
    sketches = [project_gradients(g, index.projection) for g in grads]
    scores = dict(index.scores(sketches))
    assert set(scores) == {a.lower() for a in dn.counts()}
    shares = score_request(index, grads)
    assert not shares or sum(s.share_bps for s in shares) == 10_000


def test_factory_refuses_an_existing_output_and_changes_nothing(tiny_llama_dir, tmp_path):
    from node.cli.adapter import train_adapter
    from node.errors import NodeError

    datanet = REPO / "datanets" / "pirate-cooking.jsonl"
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(NodeError, match="already exists"):
        train_adapter(datanet, tiny_llama_dir, out, TrainConfig(steps=1))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

"""Proof of Attribution end to end on the engine's own (tiny) model: a Datanet of three contributors
with planted voices goes through the adapter factory (engine/training.py + node/cli/adapter.py), which
writes a version-2 index over 3 training checkpoints; held-out requests in one contributor's voice are
then scored the way the per-request worker does (gradients at each checkpoint -> sketches -> shares).

The full measurement on SmolLM2 and the shipped Datanets is benchmarks/poa_eval.py."""

from __future__ import annotations

import json
import random

import torch

from attribution.poa import AttributionIndex
from engine.adapters.peft_format import parse_adapter, read_weights
from engine.loader import load_model
from engine.tokenizer import Tokenizer
from engine.training import LoRAParams, TrainConfig, tokenize_chat

CONTRIBUTORS = ["0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20]
# each contributor asks about their own things and answers in their own words
TOPICS = [["rum", "ships", "cannons", "parrots", "anchors", "sails"],
          ["planets", "comets", "orbits", "telescopes", "galaxies", "moons"],
          ["bread", "cakes", "butter", "ovens", "dough", "pastry"]]
VOICES = [["arr", "matey", "ahoy", "ye", "scallywag", "plunder", "deck", "crew", "treasure", "yo"],
          ["certainly", "indeed", "observe", "precisely", "celestial", "luminous", "distant", "gravity", "orbit", "sphere"],
          ["knead", "whisk", "sugar", "flour", "sweet", "golden", "crumb", "bake", "yeast", "icing"]]


def _example(rng: random.Random, k: int) -> tuple[str, str]:
    topic = rng.choice(TOPICS[k])
    words = [rng.choice(VOICES[k]) for _ in range(7)]
    return f"Tell me about {topic}.", " ".join(words).capitalize() + "!"


def test_planted_contributor_wins_on_held_out_requests(tiny_llama_dir, tmp_path):
    from node.cli.adapter import INDEX_FILE, attribute_request, checkpoint_adapters, train_adapter

    torch.manual_seed(0)
    rng = random.Random(7)
    rows = [{"contributor": CONTRIBUTORS[k], "prompt": p, "response": r}
            for k in range(3) for p, r in (_example(rng, k) for _ in range(8))]
    datanet = tmp_path / "planted.jsonl"
    datanet.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = tmp_path / "adapter"
    report = train_adapter(datanet, tiny_llama_dir, out,
                           TrainConfig(rank=4, alpha=8, steps=24, lr=2e-2, batch_size=4,
                                       target_modules=("q_proj", "v_proj", "o_proj", "down_proj")),
                           base_name="tiny", attribution_checkpoints=3)
    assert report.losses[-1] < report.losses[0]

    index = AttributionIndex.load(out / INDEX_FILE)
    assert index.version == 2 and index.num_checkpoints == 3
    assert [w is not None for w in index.checkpoint_weights] == [True, True, False]  # last = the adapter
    assert index.checkpoint_steps == [8, 16, 24] and all(lr > 0 for lr in index.checkpoint_lrs)

    # the served adapter, read back the way the engine serves it
    model = load_model(tiny_llama_dir)
    model.requires_grad_(False)
    parsed = parse_adapter("planted", out, model.config, max_rank=8, max_adapter_bytes=1 << 26)
    served = LoRAParams.from_weights(model.config, read_weights(parsed, torch.float32))
    adapters = checkpoint_adapters(model, index, served)
    tok = Tokenizer(tiny_llama_dir)

    held = [(k, *_example(random.Random(1000 + i), k)) for k in range(3) for i in range(10)]
    correct, right_share = 0, 0.0
    for k, prompt, answer in held:
        shares = attribute_request(model, index, served, tokenize_chat(tok, prompt, answer), adapters)
        assert not shares or sum(s.share_bps for s in shares) == 10_000
        bps = {s.address: s.share_bps for s in shares}
        correct += bool(bps) and max(bps, key=bps.get) == CONTRIBUTORS[k]
        right_share += bps.get(CONTRIBUTORS[k], 0) / 10_000
    rate = correct / len(held)
    print(f"\nPoA e2e (tiny Llama, factory, 3 checkpoints): right contributor first on {correct}/{len(held)} "
          f"held-out requests ({rate:.0%}), mean share of the right one {right_share / len(held):.2f}")
    assert rate >= 0.8

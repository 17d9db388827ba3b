"""`openlora generate` (node/cli/generate.py) on the tiny model and PEFT adapters: the CLI is the
engine's first user, so its test lives with the engine's (this engineer owns tests/engine only)."""

from __future__ import annotations

import json

from node.cli import main


def test_generate_json_answers_with_base_and_every_adapter(tiny_llama_dir, tiny_adapters, capsys):
    args = ["generate", "Hello there", "--model", str(tiny_llama_dir), "--device", "cpu", "--max-tokens", "6",
            "--base", "--json", "--chat"]
    for name in ("a4", "c16"):
        args += ["--adapter", f"{name}={tiny_adapters[name]}"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["adapter"] for r in results] == [None, "a4", "c16"]
    assert all(len(r["completions"][0]["token_ids"]) <= 6 for r in results)
    assert results[0]["influence"] == {} and results[1]["influence"]["a4"]["tokens"] > 0
    assert results[1]["completions"][0]["token_ids"] != results[0]["completions"][0]["token_ids"]


def test_generate_streams_text_for_a_single_answer(tiny_llama_dir, capsys):
    assert main(["generate", "Once upon a time", "--model", str(tiny_llama_dir), "--device", "cpu",
                 "--max-tokens", "5", "--temperature", "0.7", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "Once upon a time", "--model", str(tiny_llama_dir), "--device", "cpu",
                 "--max-tokens", "5", "--temperature", "0.7", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_generate_refuses_bad_input_with_a_clear_message(tiny_llama_dir, tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tiny_llama_dir), "--device", "cpu",
                 "--adapter", f"broken={tmp_path}"]) == 1
    assert "openlora: error:" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny_llama_dir), "--device", "cpu", "--adapter", "noequals"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny_llama_dir), "--device", "cpu", "--top-p", "0"]) == 1
    assert "top_p" in capsys.readouterr().err

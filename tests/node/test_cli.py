"""The `openlora` entry point: help on every command, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from node.cli import build_parser, main


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, env=env)


def _all_command_paths(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _all_command_paths(sub, (*prefix, name))


def test_every_command_has_help():
    paths = list(_all_command_paths(build_parser()))
    assert ("model", "pull") in paths
    for path in paths:
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0, path


def test_unknown_command_is_a_usage_error():
    proc = _run("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_project_errors_print_one_line_and_exit_1(tmp_path):
    import os

    env = {**os.environ, "OPENLORA_CACHE_DIR": str(tmp_path)}
    proc = _run("model", "pull", "no-such-model", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("openlora: error: unknown model")
    assert "Traceback" not in proc.stderr


def test_bad_config_value_is_a_clear_error(tmp_path):
    import os

    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 99999\n")
    proc = _run("--config", str(cfg), "model", "list", env={**os.environ})
    assert proc.returncode == 1
    assert "port" in proc.stderr and "Traceback" not in proc.stderr


def test_model_list_shows_the_cache(smollm2_dir, tmp_path):
    import os

    env = {**os.environ, "OPENLORA_CACHE_DIR": str(smollm2_dir.parent.parent)}
    proc = _run("model", "list", env=env)
    assert proc.returncode == 0
    assert "smollm2-135m-instruct" in proc.stdout


def test_serving_engine_factory_freezes_start_up_objects(monkeypatch):
    """`openlora serve` builds the default engine, then moves what start-up made out of the cyclic collector's
    reach (a full collection would walk it all, pausing serving)."""
    import gc

    from node import app as app_mod
    from node.cli import serve

    made = object()
    monkeypatch.setattr(app_mod, "default_engine_factory", lambda settings: made)
    before = gc.get_freeze_count()
    try:
        assert serve.serving_engine_factory(None) is made
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()

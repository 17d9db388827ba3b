"""Engine knobs an operator sets in the node's settings reach the EngineConfig the node builds."""

from __future__ import annotations

import pytest


def test_adapter_admit_wait_reaches_the_engine_and_bad_values_are_refused(node_engine_config, monkeypatch):
    from node.config import load_settings
    from node.errors import ConfigError

    monkeypatch.setenv("OPENLORA_ENGINE_ADAPTER_ADMIT_WAIT_MS", "2.5")
    settings = load_settings(device="cpu")
    assert settings.engine_adapter_admit_wait_ms == 2.5
    for bad in ("-1", "5000", "soon"):
        with pytest.raises(ConfigError, match="engine_adapter_admit_wait_ms"):
            load_settings(engine_adapter_admit_wait_ms=bad)
    assert node_engine_config(settings).adapter_admit_wait_ms == 2.5
    monkeypatch.delenv("OPENLORA_ENGINE_ADAPTER_ADMIT_WAIT_MS")
    assert load_settings(device="cpu").engine_adapter_admit_wait_ms == 5.0


def test_async_steps_reach_the_engine_and_bad_values_are_refused(node_engine_config, monkeypatch):
    from node.config import load_settings
    from node.errors import ConfigError

    monkeypatch.delenv("OPENLORA_ENGINE_ASYNC_STEPS", raising=False)
    assert load_settings(device="cpu").engine_async_steps == "auto"
    assert node_engine_config(load_settings(device="cpu")).async_steps is None  # the engine picks: CUDA on
    for value, want in (("on", True), ("off", False)):
        monkeypatch.setenv("OPENLORA_ENGINE_ASYNC_STEPS", value)
        assert node_engine_config(load_settings(device="cpu")).async_steps is want
    monkeypatch.delenv("OPENLORA_ENGINE_ASYNC_STEPS")
    with pytest.raises(ConfigError, match="engine_async_steps"):
        load_settings(engine_async_steps="sometimes")

"""Engine knobs an operator sets in the node's settings reach the EngineConfig the node builds."""

from __future__ import annotations

import pytest


def test_adapter_admit_wait_reaches_the_engine_and_bad_values_are_refused(tiny_llama_dir, monkeypatch):
    from engine import llm_engine
    from node.config import load_settings
    from node.errors import ConfigError
    from node.serving import EngineBridge

    monkeypatch.setenv("OPENLORA_ENGINE_ADAPTER_ADMIT_WAIT_MS", "2.5")
    settings = load_settings(device="cpu")
    assert settings.engine_adapter_admit_wait_ms == 2.5
    for bad in ("-1", "5000", "soon"):
        with pytest.raises(ConfigError, match="engine_adapter_admit_wait_ms"):
            load_settings(engine_adapter_admit_wait_ms=bad)

    class Stop(Exception):
        pass

    def fake_engine(model_dir, config):
        raise Stop(config)

    monkeypatch.setattr(llm_engine, "LLMEngine", fake_engine)
    with pytest.raises(Stop) as info:
        EngineBridge.build(settings, tiny_llama_dir, "tiny", None)
    assert info.value.args[0].adapter_admit_wait_ms == 2.5
    assert load_settings(device="cpu").engine_adapter_admit_wait_ms == 2.5  # the environment still applies
    monkeypatch.delenv("OPENLORA_ENGINE_ADAPTER_ADMIT_WAIT_MS")
    assert load_settings(device="cpu").engine_adapter_admit_wait_ms == 5.0

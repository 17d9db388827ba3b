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

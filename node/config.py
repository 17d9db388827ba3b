"""One settings object for the node, read once at the edge and passed down.

Sources, highest priority first: explicit keyword arguments (CLI flags), `OPENLORA_*` environment
variables, a TOML file (`--config FILE`, else `OPENLORA_CONFIG`, else `<config dir>/config.toml` when it
exists), then the defaults below.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("openlora"))


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("openlora"))


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir("openlora")) / "config.toml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENLORA_", extra="forbid")

    # where things live
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="downloaded and imported models")
    data_dir: Path = Field(default_factory=_default_data_dir, description="ledger, keys, adapter store, chain state")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/ledger.db")

    # engine
    model: str = Field(default=DEFAULT_MODEL, description="model name in the cache, or a HF-format directory")
    device: str = Field(default="auto", description="auto | cpu | cuda")
    adapter_dir: Path | None = Field(default=None, description="adapter store (default <data_dir>/adapters)")

    # chain
    rpc_url: str = Field(default="http://127.0.0.1:8545")
    deployment_file: Path | None = Field(default=None, description="default <data_dir>/deployment.json")

    # server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    dev: bool = Field(default=False, description="dev mode: serve adapter_dir with no chain, payment or admin token")
    served_model_name: str | None = Field(default=None, description="base model id in the API (default: model's name)")
    admin_token: SecretStr | None = Field(default=None, description="bearer token of the admin endpoints")
    max_request_bytes: int = Field(default=1 << 20, ge=1024, description="largest accepted request body (413 above)")
    max_queued_requests: int = Field(default=256, ge=1, description="requests waiting or running before 429")
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="default: the model's context length")
    engine_max_num_seqs: int = Field(default=64, ge=1, description="sequences decoded together")
    engine_num_lora_slots: int = Field(default=8, ge=1, description="adapters resident on the device at once")
    engine_max_lora_rank: int = Field(default=64, ge=1, description="largest adapter (or mix) rank served")
    engine_quantization: Literal["none", "q4"] = Field(
        default="none", description="base weights of the projections: none (model dtype) | q4 (4-bit)")
    engine_quant_group_size: int = Field(default=128, ge=16, multiple_of=16,
                                         description="largest 4-bit group (smaller where it does not divide)")
    engine_cpu_native_kernels: bool = Field(
        default=True, description="CPU: native decode kernels, compiled on first use (needs a C++ compiler)")
    engine_adapter_admit_wait_ms: float = Field(
        default=5.0, ge=0, le=1000,
        description="CUDA: per step, how long admission may wait for an adapter load to be queued so its request "
                    "joins that step (lower TTFT, the step waits ~2 ms per new 8B adapter); 0 = never wait")
    engine_async_steps: Literal["auto", "on", "off"] = Field(
        default="auto", description="queue each step on the GPU before reading the previous one's tokens back, so "
                                    "host work overlaps the GPU's (auto: on for CUDA, off for CPU)")
    log_level: str = Field(default="info", description="debug | info | warning | error")
    log_json: bool = Field(default=True, description="one JSON object per log line")

    # payments and settlement (node/payments.py, node/settlement.py)
    node_id: int | None = Field(default=None, ge=1, description="NodeRegistry id (`openlora node register` sets it)")
    keystore_file: Path | None = Field(default=None, description="node key, encrypted (default <data_dir>/node-key.json)")
    operator_address: str | None = Field(default=None, description="credited with the operator's part (default: node signer)")
    base_price_per_m_input: int = Field(default=0, ge=0, description="base-model requests: base units per 1M input tokens")
    base_price_per_m_output: int = Field(default=0, ge=0, description="base-model requests: base units per 1M output tokens")
    escrow_cache_s: float = Field(default=2.0, ge=0, description="how long an escrow read from chain is reused")
    settle_interval_s: float = Field(default=300.0, gt=0, description="settle at least this often")
    settle_batch_size: int = Field(default=500, ge=1, description="settle as soon as this many receipts wait")
    settle_confirmations: int = Field(default=2, ge=1, description="blocks before a settlement counts as final")
    settle_stuck_after_s: float = Field(default=120.0, gt=0, description="replace a pending settlement after this")
    registry_sync_s: float = Field(default=60.0, gt=0, description="how often AdapterRegistry is re-read")
    auth_domain: str = Field(default="localhost", description="EIP-4361 domain in sign-in messages")

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'ledger.db'}"

    @property
    def resolved_adapter_dir(self) -> Path:
        return self.adapter_dir or self.data_dir / "adapters"

    @property
    def resolved_deployment_file(self) -> Path:
        return self.deployment_file or self.data_dir / "deployment.json"

    @property
    def resolved_keystore_file(self) -> Path:
        return self.keystore_file or self.data_dir / "node-key.json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file chosen by `load_settings` (passed through a class attribute)."""

    path: Path | None = None

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _TomlSource.path
        if path is None or not path.exists():
            return {}
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        # accept either top-level keys or an [openlora] table
        return dict(data.get("openlora", data))


def load_settings(config_file: str | os.PathLike | None = None, *, allow_missing: bool = False,
                  **overrides: Any) -> Settings:
    """Build the settings; raises ConfigError with a readable message on bad values.

    `allow_missing` accepts a named config file that does not exist yet (for `openlora init`)."""
    path = Path(config_file) if config_file else None
    if path is None and os.environ.get("OPENLORA_CONFIG"):
        path = Path(os.environ["OPENLORA_CONFIG"])
    if path is not None and not path.exists() and not allow_missing:
        raise ConfigError(f"config file {path} does not exist")
    _TomlSource.path = path or default_config_file()
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None

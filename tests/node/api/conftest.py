"""A real node on loopback: uvicorn on a free port, the tiny model, two random PEFT adapters.

The adapters are written by the peft library itself (LoraConfig + get_peft_model on a transformers
Llama loaded from the tiny model), with lora_A/lora_B drawn from a seeded normal so they change the
output (PEFT initialises B to zero, which would make every adapter equal to the base model).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from node.app import create_app
from node.config import Settings

ADAPTERS = {"alpha": 1, "beta": 2}  # name -> seed


def make_peft_adapter(base_dir: Path, out: Path, *, seed: int, rank: int = 4,
                      targets: tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_adapter():
    return make_peft_adapter


@pytest.fixture(scope="session")
def peft_adapter_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in ADAPTERS.items():
        make_peft_adapter(tiny_llama_dir, root / name, seed=seed)
    return root


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Served:
    app: object
    base_url: str
    settings: Settings

    @property
    def node(self):
        return self.app.state.node

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kw)


@contextlib.contextmanager
def serve(settings: Settings, wait_ready: bool = True, **factories) -> Iterator[Served]:
    """Run create_app(settings) under uvicorn in a thread on a pre-bound free port; stop it on exit."""
    import uvicorn

    app = create_app(settings, **factories)
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during startup"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    served = Served(app, base, settings)
    if wait_ready:
        wait_until_ready(served)
    try:
        yield served
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until_ready(served: Served, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with served.client() as c:
        while True:
            r = c.get("/readyz")
            if r.status_code == 200:
                return
            assert served.node.load_error is None, served.node.load_error
            assert time.monotonic() < deadline, "the node did not become ready"
            time.sleep(0.05)


def dev_settings(model_dir: Path, adapter_dir: Path, **kw) -> Settings:
    values = dict(model=str(model_dir), adapter_dir=adapter_dir, dev=True, device="cpu", engine_max_num_seqs=16,
                  engine_num_lora_slots=4, engine_max_lora_rank=16, log_json=False)
    return Settings(**{**values, **kw})


@pytest.fixture(scope="session")
def dev_node(tiny_llama_dir, peft_adapter_dir) -> Iterator[Served]:
    """One dev-mode node shared by the tests that do not change its settings."""
    with serve(dev_settings(tiny_llama_dir, peft_adapter_dir)) as served:
        yield served


@pytest.fixture(scope="session")
def serve_node():
    """`serve(settings, wait_ready=True, **factories)` for tests that need a node of their own."""
    return serve


@pytest.fixture(scope="session")
def node_settings(tiny_llama_dir, peft_adapter_dir):
    """Dev settings over the tiny model and the test adapters, with overrides."""
    def make(**kw) -> Settings:
        model_dir, adapter_dir = kw.pop("model", tiny_llama_dir), kw.pop("adapter_dir", peft_adapter_dir)
        return dev_settings(model_dir, adapter_dir, **kw)

    return make

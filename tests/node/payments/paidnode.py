"""A paid node for the HTTP tests: `create_app` in paid mode (real anvil, real SQLite ledger, the tiny
model) under a real uvicorn in a thread; `asgi` can wrap the app (fault injection at the ASGI boundary)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import httpx

from chainkit import BASE_MODEL
from node import keys
from node.app import create_app
from node.config import Settings

PASSWORD = "test password"


def make_lora(base_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT adapter of the tiny model with non-zero random A and B, written by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return out


def paid_settings(chain, tiny_llama_dir: Path, root: Path) -> Settings:
    os.environ[keys.PASSWORD_ENV] = PASSWORD
    keys.create_keystore(root / "node-key.json", PASSWORD, private_key=chain.node_key)
    chain.extra["deployment"].save(root / "deployment.json")
    (root / "store").mkdir(exist_ok=True)
    return Settings(model=str(tiny_llama_dir), served_model_name=BASE_MODEL, adapter_dir=root / "store", dev=False,
                    device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=chain.anvil.url,
                    deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
                    settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600,
                    base_price_per_m_input=1_000_000, base_price_per_m_output=2_000_000, escrow_cache_s=0,
                    engine_max_num_seqs=8, engine_num_lora_slots=2, engine_max_lora_rank=8, log_json=False)


class PaidServer:
    def __init__(self, settings: Settings, asgi=None):
        import uvicorn

        self.app = create_app(settings)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.asgi = asgi(self.app) if asgi is not None else self.app  # what uvicorn serves
        self.server = uvicorn.Server(uvicorn.Config(self.asgi, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=self.url) as c:
            while True:
                assert time.monotonic() < deadline and self.thread.is_alive(), "node did not become ready"
                if self.server.started and c.get("/readyz").status_code == 200:
                    break
                assert self.app.state.node.load_error is None, self.app.state.node.load_error
                time.sleep(0.05)

    @property
    def money(self):
        return self.app.state.node.extras["money"]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        os.environ.pop(keys.PASSWORD_ENV, None)

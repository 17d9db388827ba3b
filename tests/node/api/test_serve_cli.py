"""`openlora serve --dev --adapter-dir DIR` as a user runs it: a separate process, settings from a TOML
file and OPENLORA_* variables, the official client against it, and a clean stop on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openlora_serve_dev(tmp_path, tiny_llama_dir, peft_adapter_dir):
    port = _free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[openlora]\nmax_request_bytes = 4096\ndevice = "cpu"\nport = {port}\n')
    env = {**os.environ, "OPENLORA_DATA_DIR": str(tmp_path / "data"), "OPENLORA_ADMIN_TOKEN": "tok-from-env",
           "OPENLORA_SERVED_MODEL_NAME": "tiny-base"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--config", str(config), "serve", "--dev", "--model", str(tiny_llama_dir),
         "--adapter-dir", str(peft_adapter_dir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "openlora serve did not become ready"
            time.sleep(0.2)

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny-base", "alpha", "beta"}
        resp = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3)
        assert resp.usage.completion_tokens >= 1 and resp.model_extra["receipt_id"].startswith("dev-")
        # from the TOML file: a 4 KiB body limit
        big = httpx.post(base + "/v1/completions", json={"model": "alpha", "prompt": "x" * 5000}, timeout=10)
        assert big.status_code == 413
        # from the environment: an admin token, required even in dev mode once set
        assert httpx.get(base + "/admin/adapters", timeout=10).status_code == 401
        ok = httpx.get(base + "/admin/adapters", headers={"Authorization": "Bearer tok-from-env"}, timeout=10)
        assert ok.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records]
    assert any("ready" in m for m in messages) and any(m == "engine stopped" for m in messages)
    assert "tok-from-env" not in err and "tok-from-env" not in out


def test_serve_dev_without_adapter_dir_is_a_clear_error(tmp_path):
    env = {**os.environ, "OPENLORA_DATA_DIR": str(tmp_path / "empty")}
    r = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--dev", "--port", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "--adapter-dir" in r.stderr and "Traceback" not in r.stderr


def test_serve_paid_without_node_setup_fails_with_one_line(tmp_path, tiny_llama_dir):
    # no --dev: the payments side's services refuse to start (no node id, no key); the CLI says why
    env = {**os.environ, "OPENLORA_DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--model", str(tiny_llama_dir), "--device", "cpu",
                        "--port", str(_free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("openlora: error: ")

"""A local anvil (Foundry's dev chain, from the npm package @foundry-rs/anvil): start, wait, stop.

`Anvil(...).start()` runs one as a child process on a free port (or a given one), optionally with its
state persisted to a file (`anvil --state FILE`: loaded at start, dumped on exit and every few
seconds); `detach=True` starts it in its own session so it outlives the caller (`openlora chain up
--detach`), with a pid file for `stop_pid_file`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from node.chain.errors import AnvilError, RpcUnavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CHAIN_IDS = (31337, 1337)

# Anvil's default mnemonic ("test test ... junk"): public, well-known development keys. Never use
# them anywhere but a local chain.
DEV_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)


def find_anvil() -> str:
    """The anvil binary: $OPENLORA_ANVIL, else the native binary npm installed for this platform, else the
    repository's node_modules/.bin/anvil, else PATH.

    The native binary comes before npm's `.bin/anvil`: that is a Node wrapper which, on SIGTERM, passes the
    signal to anvil and exits at once, so waiting on it returned while anvil was still writing its state file
    (seen as a missing state file in CI) and still holding its port."""
    env = os.environ.get("OPENLORA_ANVIL")
    if env:
        if not (Path(env).is_file() and os.access(env, os.X_OK)):
            raise AnvilError(f"OPENLORA_ANVIL={env} is not an executable file")
        return env
    for native in sorted((REPO_ROOT / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil")):
        if native.is_file() and os.access(native, os.X_OK):
            return str(native)
    local = REPO_ROOT / "node_modules" / ".bin" / "anvil"
    if local.exists():
        return str(local)
    found = shutil.which("anvil")
    if found:
        return found
    raise AnvilError("anvil not found: run `npm install` in the repository root (package @foundry-rs/anvil)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rpc_request(url: str, method: str, params: list | None = None, timeout: float = 5.0):
    """One JSON-RPC call with the standard library (no web3 needed); RpcUnavailable when unreachable."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RpcUnavailable(f"no JSON-RPC answer from {url}: {exc}") from None
    if "error" in reply:
        raise RpcUnavailable(f"{method} at {url} failed: {reply['error']}")
    return reply.get("result")


def chain_id_at(url: str, timeout: float = 5.0) -> int:
    return int(rpc_request(url, "eth_chainId", timeout=timeout), 16)


def wait_for_rpc(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> int:
    """Polls `url` until it answers eth_chainId; returns the chain id."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return chain_id_at(url, timeout=2.0)
        except RpcUnavailable:
            if proc is not None and proc.poll() is not None:
                raise AnvilError(f"anvil exited with code {proc.returncode} before answering at {url}") from None
            if time.monotonic() > deadline:
                raise AnvilError(f"anvil did not answer at {url} within {timeout:.0f}s") from None
            time.sleep(0.1)


class Anvil:
    """One anvil process. Use as a context manager, or call start()/stop()."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, chain_id: int = 31337,
                 state_file: str | os.PathLike | None = None, state_interval: int = 5,
                 block_time: float | None = None, log_file: str | os.PathLike | None = None,
                 detach: bool = False, pid_file: str | os.PathLike | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.host = host
        self.port = port
        self.chain_id = chain_id
        self.state_file = Path(state_file) if state_file else None
        self.state_interval = state_interval
        self.block_time = block_time
        self.log_file = Path(log_file) if log_file else None
        self.detach = detach
        self.pid_file = Path(pid_file) if pid_file else None
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise AnvilError("anvil has no port yet; call start() first")
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [find_anvil(), "--host", self.host, "--port", str(self.port), "--chain-id", str(self.chain_id)]
        if self.state_file is not None:
            cmd += ["--state", str(self.state_file), "--state-interval", str(self.state_interval)]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0) -> "Anvil":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        else:
            try:
                chain_id_at(self.url, timeout=1.0)
            except RpcUnavailable:
                pass
            else:
                raise AnvilError(f"something already answers JSON-RPC at {self.url}")
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=self.detach)
        except OSError as exc:
            raise AnvilError(f"cannot start anvil: {exc}") from None
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            got = wait_for_rpc(self.url, timeout=timeout, proc=self.proc)
        except AnvilError as exc:
            self.stop()
            hint = f" (log: {self.log_file})" if self.log_file is not None else ""
            raise AnvilError(f"{exc}{hint}") from None
        if got != self.chain_id:
            self.stop()
            raise AnvilError(f"anvil at {self.url} reports chain id {got}, expected {self.chain_id}")
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(json.dumps({"pid": self.proc.pid, "url": self.url}))
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (anvil dumps its state, if any, on the way out), then SIGKILL after `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "Anvil":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_pid_file(pid_file: str | os.PathLike) -> dict | None:
    """The {"pid", "url"} a detached `chain up` left, when that process is still alive."""
    path = Path(pid_file)
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return info


def stop_pid_file(pid_file: str | os.PathLike, timeout: float = 15.0) -> bool:
    """Stops the detached anvil recorded in `pid_file` (SIGTERM, so it dumps its state); True when one
    was running."""
    path = Path(pid_file)
    info = read_pid_file(path)
    if info is None:
        path.unlink(missing_ok=True)
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    path.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

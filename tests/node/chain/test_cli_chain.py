"""`openlora chain up|status|down` and `openlora deploy` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node.chain.anvil import Anvil, find_anvil, free_port

pytestmark = pytest.mark.anvil


@pytest.fixture
def env(tmp_path):
    find_anvil()  # installed by `make test`; raises AnvilError (a failure, never a skip) when missing
    port = free_port()
    e = {**os.environ, "OPENLORA_DATA_DIR": str(tmp_path / "data"), "OPENLORA_RPC_URL": f"http://127.0.0.1:{port}",
         "OPENLORA_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    yield e
    subprocess.run([sys.executable, "-m", "node.cli", "chain", "down"], env=e, capture_output=True, timeout=60)


def _cli(env, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "node.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_chain_up_deploys_once_and_keeps_state(env, tmp_path):
    up = json.loads(_cli(env, "chain", "up", "--detach", "--json").stdout)
    assert up["deployedNow"] is True
    dep_file = tmp_path / "data" / "deployment.json"
    assert json.loads(dep_file.read_text())["contracts"] == up["deployment"]["contracts"]

    status = json.loads(_cli(env, "chain", "status", "--json").stdout)
    assert status["reachable"] and status["deployed"] and status["chainId"] == 31337
    assert status["counts"] == {"datanets": 0, "adapters": 0, "nodes": 0}

    again = json.loads(_cli(env, "chain", "up", "--detach", "--json").stdout)  # already running: reuse
    assert again["deployedNow"] is False

    assert "anvil stopped" in _cli(env, "chain", "down").stdout
    assert "not reachable" in _cli(env, "chain", "status").stdout

    # restart from the persisted state: the contracts are still there, nothing is redeployed
    restarted = json.loads(_cli(env, "chain", "up", "--detach", "--json").stdout)
    assert restarted["deployedNow"] is False
    assert restarted["deployment"]["contracts"] == up["deployment"]["contracts"]
    assert (tmp_path / "data" / "chain" / "anvil-state.json").exists()


def test_deploy_to_a_running_chain(env, tmp_path):
    port = int(env["OPENLORA_RPC_URL"].rsplit(":", 1)[1])
    with Anvil(port=port):
        first = json.loads(_cli(env, "deploy", "--json", "--thawing-period", "600").stdout)
        assert first["deployedNow"] and first["deployment"]["thawingPeriod"] == 600
        second = json.loads(_cli(env, "deploy", "--json").stdout)
        assert not second["deployedNow"] and second["deployment"] == first["deployment"]
        forced = json.loads(_cli(env, "deploy", "--json", "--force").stdout)
        assert forced["deployedNow"] and forced["deployment"]["contracts"] != first["deployment"]["contracts"]
        text = _cli(env, "chain", "status").stdout
        assert "on chain" in text and "UsageSettlement" in text


def test_errors_are_one_line(env):
    proc = _cli(env, "deploy", check=False)  # nothing listens on rpc_url
    assert proc.returncode == 1
    assert proc.stderr.startswith("openlora: error: no JSON-RPC answer") and "Traceback" not in proc.stderr
    remote = {**env, "OPENLORA_RPC_URL": "https://rpc.example.org"}
    proc = _cli(remote, "chain", "up", check=False)
    assert proc.returncode == 1 and "use `openlora deploy`" in proc.stderr
    assert "no detached anvil" in _cli(env, "chain", "down").stdout


def test_chain_up_in_the_foreground_stops_on_ctrl_c(env, tmp_path):
    import signal
    import time

    # stderr to a file (never a pipe nobody reads), and faulthandler on: if the CLI does not stop, SIGABRT
    # makes it print every thread's stack there, which the failure then shows
    err_path = tmp_path / "chain-up.stderr"
    with open(err_path, "w") as err:
        # the child starts with SIGINT's default disposition: a test run launched in the background of a
        # non-interactive shell inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "chain", "up"],
                                env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C" in line or not line:
                break
        assert any("deployed now" in x for x in lines), lines
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            log = tmp_path / "data" / "chain" / "anvil.log"
            pytest.fail(f"chain up did not stop on Ctrl-C; its stderr:\n{err_path.read_text()[-6000:]}\n"
                        f"anvil.log tail:\n{log.read_text()[-2000:] if log.exists() else '(none)'}")
        assert code == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "data" / "chain" / "anvil-state.json").exists()
    assert "not reachable" in _cli(env, "chain", "status").stdout

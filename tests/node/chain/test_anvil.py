"""Starting, stopping and restarting a local anvil, with and without persisted state."""

from __future__ import annotations

import pytest

from node.chain import anvil as anvil_mod
from node.chain.anvil import Anvil, find_anvil, rpc_request
from node.chain.errors import AnvilError, RpcUnavailable

pytestmark = pytest.mark.anvil


def test_anvil_is_installed_by_the_project():
    # `make test` installs anvil from npm; a missing binary is a set-up failure, not a reason to skip
    assert find_anvil()


def test_the_process_started_is_anvil_itself_not_the_npm_wrapper():
    # npm's .bin/anvil is a Node script that exits on SIGTERM before anvil has written its state file; the
    # process we signal and wait on must be anvil (the native binary from @foundry-rs/anvil-<platform>)
    with open(find_anvil(), "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_start_answers_and_stop_ends_the_process():
    node = Anvil().start()
    proc = node.proc
    try:
        assert node.running()
        assert anvil_mod.chain_id_at(node.url) == 31337
    finally:
        node.stop()
    assert not node.running()
    # the process is gone (checking the port instead would race with other anvils on this machine)
    assert proc.poll() is not None


def test_state_survives_a_restart(tmp_path):
    state = tmp_path / "state.json"
    with Anvil(state_file=state) as node:
        rpc_request(node.url, "evm_mine", [])
        rpc_request(node.url, "evm_mine", [])
        mined = int(rpc_request(node.url, "eth_blockNumber"), 16)
    assert state.exists()
    with Anvil(state_file=state) as node:
        assert int(rpc_request(node.url, "eth_blockNumber"), 16) == mined


def test_refuses_a_port_already_serving_rpc():
    with Anvil() as node, pytest.raises(AnvilError, match="already answers"):
        Anvil(port=node.port).start()


def test_custom_chain_id():
    with Anvil(chain_id=1337) as node:
        assert anvil_mod.chain_id_at(node.url) == 1337


def test_bad_binary_override_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENLORA_ANVIL", str(tmp_path / "nope"))
    with pytest.raises(AnvilError, match="OPENLORA_ANVIL"):
        find_anvil()


def test_detached_anvil_is_stopped_through_its_pid_file(tmp_path):
    pid_file = tmp_path / "anvil.pid"
    node = Anvil(detach=True, pid_file=pid_file).start()
    url = node.url
    node.proc = None  # forget it, as `chain up --detach` does
    assert anvil_mod.read_pid_file(pid_file)["url"] == url
    assert anvil_mod.stop_pid_file(pid_file) is True
    assert not pid_file.exists()
    with pytest.raises(RpcUnavailable):
        rpc_request(url, "eth_chainId", timeout=1.0)
    assert anvil_mod.stop_pid_file(pid_file) is False


def test_a_corrupt_state_file_is_a_clear_error(tmp_path):
    state = tmp_path / "state.json"
    state.write_text("{ not a state")
    with pytest.raises(AnvilError, match="exited with code .*log: "):
        Anvil(state_file=state, log_file=tmp_path / "anvil.log").start(timeout=20)

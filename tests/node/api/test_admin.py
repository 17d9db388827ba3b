"""Admin endpoints: bearer admin token (required unless dev mode without one), list/load/unload/pin."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from node.app import dev_services

TOKEN = "admin-secret-for-tests"


@pytest.fixture(scope="module")
def admin_node(serve_node, node_settings):
    with serve_node(node_settings(admin_token=SecretStr(TOKEN))) as served:
        yield served


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def _row(c, name):
    rows = {r["name"]: r for r in c.get("/admin/adapters", headers=_auth()).json()["adapters"]}
    return rows[name]


def test_admin_needs_the_bearer_token(admin_node):
    with admin_node.client() as c:
        r = c.get("/admin/adapters")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_admin_token"
        r = c.get("/admin/adapters", headers=_auth("wrong"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
        r = c.post("/admin/adapters/alpha/load", headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401
        # a refused admin call changed nothing
        assert _row(c, "alpha")["tier"] == "disk"
        r = c.get("/admin/adapters", headers=_auth())
        assert r.status_code == 200
        assert {a["name"] for a in r.json()["adapters"]} == {"alpha", "beta"}
        assert r.json()["stats"]["slots_total"] == 4


def test_load_pin_unpin_unload(admin_node):
    with admin_node.client() as c:
        r = c.post("/admin/adapters/alpha/load", headers=_auth())
        assert r.status_code == 200, r.text
        assert r.json()["tier"] == "device" and r.json()["slot"] is not None

        r = c.post("/admin/adapters/beta/pin", headers=_auth())
        assert r.status_code == 200 and r.json()["pinned"] is True
        assert _row(c, "beta")["tier"] in ("device", "loading")

        r = c.delete("/admin/adapters/beta/pin", headers=_auth())
        assert r.status_code == 200 and r.json()["pinned"] is False

        r = c.post("/admin/adapters/alpha/unload", headers=_auth())
        assert r.status_code == 200 and r.json()["tier"] == "disk" and r.json()["slot"] is None
        # unloaded adapters are still served: the next request loads them again
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        assert _row(c, "alpha")["tier"] == "device"

        for path in ("/admin/adapters/nope/load", "/admin/adapters/nope/unload", "/admin/adapters/nope/pin"):
            r = c.post(path, headers=_auth())
            assert r.status_code == 404, path
            assert r.json()["error"]["type"] == "not_found_error"


def test_dev_mode_without_token_is_open_and_paid_mode_without_token_is_closed(serve_node, node_settings, dev_node):
    with dev_node.client() as c:
        assert c.get("/admin/adapters").status_code == 200
    # a node that is not in dev mode and has no admin token refuses admin calls outright
    with serve_node(node_settings(dev=False), services_factory=dev_services) as served, served.client() as c:
        r = c.get("/admin/adapters")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        r = c.get("/admin/adapters", headers=_auth())
        assert r.status_code == 403

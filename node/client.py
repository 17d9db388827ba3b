"""Pay an OpenLoRA node per request with signed cumulative vouchers (an `httpx.Auth`).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused",
                    http_client=httpx.Client(auth=VoucherAuth(PRIVATE_KEY)))

Each request carries `X-OpenLoRA-Voucher`: a voucher (docs/formats.md) whose cumulativeValue is what the
payer has promised this node in total. Before the first request the helper asks the node
(`GET /v1/payers/{address}`) for its node id, its EIP-712 domain and the voucher it already holds. The
node answers 402 `voucher_too_low` with the value it needs (`error.required`, a decimal string; older nodes
only said "... at least N" in the message) when a voucher does not cover the request's maximum cost; the
helper then signs exactly N and retries once, and remembers the
step per model, so the next request of that model pre-signs enough. A voucher only authorises: the node
collects actual costs (never more than it signed receipts for), so signing the maximum is safe.

The voucher is the credential: any `Authorization` header (the openai client always sends one) is
dropped from voucher-paid requests so it is not mistaken for an API key.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Generator

import httpx
from eth_account import Account

from attribution.eip712 import Domain
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher

_AT_LEAST = re.compile(r"at least (\d+)")


class VoucherAuth(httpx.Auth):
    requires_request_body = True  # the body is re-sent after a 402, so httpx must keep it
    # Only the 402 answer and the terms lookup are read here; a paid stream reaches the caller unread
    # (httpx's requires_response_body would buffer every response, streams included).

    def __init__(self, private_key, *, max_cumulative: int | None = None):
        self._key = private_key  # never logged
        self.address = Account.from_key(private_key).address
        self.max_cumulative = max_cumulative  # a hard stop on what this client will ever promise
        self.node_id: int | None = None
        self.domain: Domain | None = None
        self.cumulative = 0
        self.step: dict[str, int] = {}  # model -> the last increment a request of it needed
        self._lock = threading.Lock()

    # -- state ------------------------------------------------------------------------------------

    def _learn(self, info: dict) -> None:
        d = info["eip712_domain"]
        with self._lock:
            self.node_id = int(info["node_id"])
            self.domain = Domain(int(d["chainId"]), d["verifyingContract"])
            # the node's stored voucher and spend are the floor: never sign below what it holds
            self.cumulative = max(self.cumulative, int(info["voucher_cumulative_value"]),
                                  int(info["billed"]) + int(info["reserved"]))

    def _sign(self, value: int) -> str:
        if self.max_cumulative is not None and value > self.max_cumulative:
            raise httpx.RequestError(f"the node asks for a cumulative voucher of {value}, above this client's "
                                     f"limit of {self.max_cumulative}")
        sv = sign_voucher(self.domain, self._key, self.node_id, value, int(time.time()))
        return encode_voucher_header(sv)

    @staticmethod
    def _model(request: httpx.Request) -> str:
        try:
            return str(json.loads(request.content or b"{}").get("model", ""))
        except (ValueError, AttributeError):
            return ""

    # -- the flow ---------------------------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.pop("Authorization", None)
        if self.domain is None:
            info = yield httpx.Request("GET", request.url.join(f"/v1/payers/{self.address}"))
            if info.status_code != 200:
                raise httpx.HTTPStatusError(f"cannot learn the node's payment terms: HTTP {info.status_code} {info.text[:300]}",
                                            request=info.request, response=info)
            self._learn(info.json())
        model = self._model(request)
        with self._lock:
            value = self.cumulative + self.step.get(model, 0)
        request.headers[VOUCHER_HEADER] = self._sign(value)
        response = yield request
        if response.status_code == 402:
            need = self._needed(response)
            if need is not None and need > value:
                with self._lock:
                    self.step[model] = max(self.step.get(model, 0), need - self.cumulative)
                request.headers[VOUCHER_HEADER] = self._sign(need)
                value = need
                response = yield request
        if response.status_code < 400:
            with self._lock:
                self.cumulative = max(self.cumulative, value)

    @staticmethod
    def _must_read(response: httpx.Response) -> bool:
        return response.status_code == 402 or response.request.url.path.startswith("/v1/payers/")

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if self._must_read(response):
                response.read()
            try:
                request = flow.send(response)
            except StopIteration:
                return

    async def async_auth_flow(self, request: httpx.Request):
        await request.aread()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if self._must_read(response):
                await response.aread()
            try:
                request = flow.send(response)
            except StopIteration:
                return

    @staticmethod
    def _needed(response: httpx.Response) -> int | None:
        try:
            err = response.json().get("error", {})
        except ValueError:
            return None
        if not isinstance(err, dict) or err.get("code") != "voucher_too_low":
            return None
        required = err.get("required")  # the cumulative value to sign, a decimal string (or number)
        if isinstance(required, int) and not isinstance(required, bool):
            return required
        if isinstance(required, str) and required.isdigit():
            return int(required)
        m = _AT_LEAST.search(err.get("message", ""))  # nodes from before `required`: read the prose
        return int(m.group(1)) if m else None


__all__ = ["VoucherAuth"]

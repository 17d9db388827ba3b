"""Structured logs: one JSON object per line, carrying the id of the request being served.

The request id lives in a contextvar set by the request-id middleware, so any logger called while a
request is handled (routes, accountant) tags its lines without being passed the id. Headers and
bodies are never logged: they can hold API keys and signatures.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("openlora_request_id", default=None)

# last line of defence: anything shaped like a bearer token, API key or 32-byte hex secret is masked
_SECRET_RE = re.compile(r"(?i)(bearer\s+)\S+|\b(sk|olk)-[A-Za-z0-9_-]{8,}|\b0x[0-9a-fA-F]{64}\b")


def redact(text: str) -> str:
    return _SECRET_RE.sub(lambda m: (m.group(1) or "") + "[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key in ("client_request_id", "method", "path", "status", "duration_ms", "model", "prompt_tokens", "completion_tokens"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        record.msg, record.args = redact(record.getMessage()), ()
        return True


# libraries that log URLs at INFO: an RPC or registry URL can carry an API key in its path
_QUIET = ("httpx", "httpcore", "urllib3", "web3", "asyncio")


def configure(level: str = "info", json_lines: bool = True) -> None:
    """One handler on the root logger (so `node.*`, `engine.*`, `attribution.*` and uvicorn all reach
    it), replacing any earlier one."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

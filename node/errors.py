"""Errors of the node shell.

    NodeError
    ├── ConfigError        configuration is missing or invalid
    ├── ModelPullError     a model could not be downloaded, verified or imported
    └── ApiError           a request refused with an HTTP status (node/api/errors.py renders it)
        ├── BadRequest         400
        ├── Unauthorized       401
        ├── PaymentRequired    402
        ├── Forbidden          403
        ├── NotFound           404
        ├── PayloadTooLarge    413
        ├── Overloaded         429 (Retry-After)
        └── NotReady           503
"""


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError):
    """Configuration is missing or invalid."""


class ModelPullError(NodeError):
    """A model could not be downloaded, verified or imported."""


class ApiError(NodeError):
    """A request the node refuses on purpose; rendered as an OpenAI-style error body with `status_code`.
    Subclass it (or one of the classes below) to refuse with another status or error type."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, extra: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        # machine-readable extension fields sent inside the error object next to OpenAI's four
        # (e.g. a 402's `required` cumulative value and `node_id`)
        self.extra = dict(extra or {})


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401
    error_type = "authentication_error"


class PaymentRequired(ApiError):
    status_code = 402
    error_type = "insufficient_quota"


class Forbidden(ApiError):
    status_code = 403
    error_type = "permission_error"


class NotFound(ApiError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLarge(ApiError):
    status_code = 413


class Overloaded(ApiError):
    status_code = 429
    error_type = "rate_limit_error"


class NotReady(ApiError):
    status_code = 503
    error_type = "service_unavailable"

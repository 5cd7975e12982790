"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import msgspec

_DEFAULTS: dict[int, tuple[str, str | None]] = {  # status -> (type, code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "server_overloaded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
}


class ApiError(Exception):
    """An error answered to the client; `type` and `code` default from the status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        default_type, default_code = _DEFAULTS.get(
            status, ("invalid_request_error" if status < 500 else "server_error", None))
        self.status = status
        self.message = message
        self.param = param
        self.type = type or default_type
        self.code = code or default_code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def from_validation(e: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> ApiError:
    """A 400 from msgspec's message, e.g. "Expected `int`, got `str` - at `$.max_tokens`" (param `max_tokens`)."""
    if isinstance(e, msgspec.ValidationError):
        message, _, where = str(e).partition(" - at `$")
        path = where.rstrip("`").lstrip(".").replace("[...]", "")  # "[...]": a value of a map (logit_bias)
        param = prefix + path if path else (prefix.rstrip(".") or None)
        return bad_request(f"{message} (at {param})" if param else message, param)
    return bad_request(f"malformed JSON body: {e}")

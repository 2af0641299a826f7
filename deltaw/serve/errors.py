"""Errors the server answers with, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Why one exception type carrying the HTTP status: every layer (request parsing, adapter store, scheduler) can
raise the exact answer a client should get, and one handler turns it into JSON, so clients written for the
OpenAI API (and its SDK's retry logic: it retries 408/409/429/5xx) see familiar statuses and types.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error with the HTTP status and OpenAI error fields it should be answered with."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, code={self.code!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, why: str = "") -> APIError:
    extra = f": {why}" if why else ""
    return APIError(404, f"The model {model!r} does not exist{extra}", type="invalid_request_error", param="model",
                    code="model_not_found")


def adapter_load_failed(name: str, reason: str) -> APIError:
    # 422, not 5xx: the adapter on disk is broken, and retrying (as SDKs do on 5xx) cannot fix it.
    return APIError(422, f"adapter {name!r} cannot be loaded: {reason}", type="invalid_request_error",
                    param="model", code="adapter_load_failed")


def server_error(message: str, code: str | None = "internal_error") -> APIError:
    return APIError(500, message, type="server_error", code=code)


def overloaded(message: str, code: str = "overloaded") -> APIError:
    return APIError(503, message, type="server_error", code=code)

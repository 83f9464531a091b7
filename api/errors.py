"""JSON errors: ``{"error": {"code", "message"}}`` for every failure the API answers.

``lorasearch.errors.BadInput`` codes map to HTTP statuses here (one table);
FastAPI's own validation errors and Starlette's HTTP errors are reshaped into
the same body; anything else is a bug and becomes a JSON 500 (logged with its
traceback on stderr), never an HTML page.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorasearch.errors import BadInput

log = logging.getLogger("lorasearch.api")

# BadInput code -> HTTP status. 400: the file is malformed; 413: too large; 415: not
# safetensors (pickles are refused by suffix or magic bytes, never unpickled); 422: a
# well-formed request we cannot process (a valid safetensors file that is not a LoRA
# layout we know, bad parameters).
STATUS_BY_CODE: dict[str, int] = {
    "truncated": 400,
    "bad_header": 400,
    "bad_dtype": 400,
    "bad_offsets": 400,
    "non_finite": 400,
    "bad_factors": 400,
    "bad_config": 400,
    "bad_metadata": 400,
    "unreadable": 400,
    "bad_multipart": 400,
    "client_disconnected": 400,
    "not_found": 404,
    "unknown_id": 404,
    "unknown_family": 404,
    "no_map": 404,
    "too_large": 413,
    "pickle_refused": 415,
    "not_safetensors": 415,
    "unsupported_media_type": 415,
    "unsupported_layout": 422,
    "not_a_lora": 422,
    "bad_view": 422,
    "bad_parameter": 422,
    "missing_file": 422,
    "too_many_files": 422,
    "unexpected_field": 422,
    # attribution of an uploaded checkpoint: its base model
    "needs_base": 422,
    "bad_base": 422,
    "base_not_local": 422,
    "base_mismatch": 422,
    "no_difference": 422,
    "not_a_checkpoint": 422,
    "hub_error": 422,
    "bad_source": 422,
}
DEFAULT_BAD_INPUT_STATUS = 400

# What the HTTP statuses mean, for the OpenAPI document (every route lists the ones it can answer).
STATUS_MEANING: dict[int, str] = {
    400: "Malformed file or request body",
    401: "Missing or malformed Authorization header",
    403: "Wrong token, or writes disabled (no --token-file)",
    404: "Unknown id or family",
    409: "An indexing run holds the store",
    413: "Upload over the size cap",
    415: "Not a safetensors file (pickles are refused, never unpickled)",
    422: "Bad parameters, or a valid file that is not a LoRA layout we know",
    503: "The server cannot store the upload (its disk)",
}


class ApiError(Exception):
    """An error with its HTTP status and machine-readable code.

    Args:
        status: HTTP status.
        code: short reason, e.g. ``too_large``.
        message: one line for people.
        headers: extra response headers (e.g. ``Connection: close``).
    """

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error body."""
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=dict(headers or {}))


def scrub(message: str, replacements: Iterable[tuple[str, str]]) -> str:
    """Replace server-side temp paths in a message by what the client called its files."""
    for old, new in replacements:
        if old:
            message = message.replace(old, new)
    return message


def from_bad_input(exc: BadInput, replacements: Iterable[tuple[str, str]] = ()) -> ApiError:
    """A library BadInput as an ApiError (status from ``STATUS_BY_CODE``; temp paths scrubbed)."""
    msg = scrub(str(exc), replacements)
    code = exc.code
    if code == "bad_header" and "not a safetensors file" in msg:
        # the first bytes are not a safetensors header at all: wrong media type, not a damaged file
        code = "not_safetensors"
    return ApiError(STATUS_BY_CODE.get(code, DEFAULT_BAD_INPUT_STATUS), code, msg)


def json_safe(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, NaN/Inf as null, other objects as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return str(obj)


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body", "header"))
        parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _close_if_body(request: Request) -> dict[str, str]:
    """``Connection: close`` when the request came with a body we answer without reading (so it is not read)."""
    length = request.headers.get("content-length", "0")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    return {"Connection": "close"} if chunked or not length.isdigit() or int(length) > 65536 else {}


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden", 413: "too_large",
               415: "unsupported_media_type", 400: "bad_request"}


def install_handlers(app: FastAPI) -> None:
    """Register the JSON error handlers on an app."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(BadInput)
    async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
        e = from_bad_input(exc)
        return error_response(e.status, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{k: json_safe(v) for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return error_response(422, "bad_parameter", _validation_message(errs), _close_if_body(request), details=errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = {**(getattr(exc, "headers", None) or {}), **_close_if_body(request)}
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Last resort: a real bug. The traceback goes to the log; the client gets JSON.
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", f"internal error ({exc.__class__.__name__}); see the server log")

"""Every error is an OpenAI-format JSON body; no exception's text ever reaches a client."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("antidistill.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

# public messages of the engine's error codes (DoneEvent.error)
ENGINE_ERRORS = {
    "nonfinite_scores": (500, "the antidistillation scores for this request were not finite; the request was "
                              "ended (the server never falls back to the undefended teacher)"),
    "generation_failed": (500, "generation failed for this request"),
    "invalid_seed": (400, "seed must be an integer in the int64 range"),
    "engine_dead": (503, "the generation engine is not running"),
    "server_shutting_down": (503, "the server is shutting down"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def engine_error(code: str | None) -> APIError:
    status, message = ENGINE_ERRORS.get(code or "", (500, "generation failed for this request"))
    return APIError(status, message, code=code)


def error_event(code: str | None) -> str:
    """A server-sent event carrying an engine error (OpenAI streams errors this way)."""
    e = engine_error(code)
    return f"data: {json.dumps(error_body(e.status, e.message, code=e.code))}\n\n"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        return validation_response(e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        message = {404: "no such route", 405: "method not allowed"}.get(e.status_code, "request failed")
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error")


def validation_error(errors) -> APIError:
    """400 naming the first invalid field; pydantic's message, never the offending value."""
    first = errors[0] if errors else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    msg = str(first.get("msg", "invalid request"))[:200]
    return APIError(400, f"{loc or 'body'}: {msg}", loc)


def validation_response(errors) -> JSONResponse:
    e = validation_error(errors)
    return error_response(e.status, e.message, e.param)

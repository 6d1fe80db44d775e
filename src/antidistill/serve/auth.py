"""Bearer-key auth as a FastAPI dependency: constant-time, and fails closed.

An empty key is a startup error (``ServeConfig``); no key at all is allowed on a loopback host,
or elsewhere only with ``insecure_no_auth`` (``--insecure-no-auth``), and then logged loudly.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import Request

from .config import ServeConfig, is_loopback
from .errors import APIError

log = logging.getLogger("antidistill.serve")


def key_dependency(cfg: ServeConfig):
    """The dependency every ``/v1`` route (and ``/openapi.json``) runs before any other work."""
    expected = None if cfg.api_key is None else f"Bearer {cfg.api_key}".encode("ascii")
    if expected is None:
        if is_loopback(cfg.host):
            log.warning("serving without an API key on loopback host %s", cfg.host)
        else:
            log.warning("INSECURE: serving without an API key on %s (--insecure-no-auth): anyone who can "
                        "reach this port can sample the teacher", cfg.host)

    async def require_key(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not secrets.compare_digest(got, expected):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_key

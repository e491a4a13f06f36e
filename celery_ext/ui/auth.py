"""The dashboard's login, session cookie and CSRF tokens.

A browser cannot send ``Authorization: Bearer``, so ``POST /ui/login`` takes ``api.token`` once
and sets ``celery_ext_ui``, an HttpOnly, SameSite=Strict cookie (path ``/ui``) holding an HMAC of
the token (never the token).  ``Gate`` (celery_ext/api.py) accepts that cookie on ``/ui`` paths
only; the JSON API keeps needing the bearer header.  Changing the token logs every browser out.

Every POST of the dashboard (cancel, retry, logout) carries ``X-CSRF-Token``: an HMAC, under a
server key, of a random per-browser value held in the HttpOnly cookie ``celery_ext_csrf``.  The key
is derived from the token, or, with no token (the UI is then open like the API, on 127.0.0.1 by
default), is random per process: a page older than the process asks to be reloaded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import quote

from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Scope

SESSION_COOKIE = "celery_ext_ui"
CSRF_COOKIE = "celery_ext_csrf"
CSRF_HEADER = "x-csrf-token"
PREFIX = "/ui"
# Reachable without a session: the login form and the static files (htmx, css).
OPEN_PATHS = frozenset({"/ui/login"})
OPEN_PREFIXES = ("/ui/static/",)

_PROCESS_KEY = secrets.token_bytes(32)


def is_ui(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def session_value(token: bytes) -> str:
    """What the session cookie holds: an HMAC of the token, so the cookie never is the token."""
    return hmac.new(token, b"celery_ext.ui.session.v1", hashlib.sha256).hexdigest()


def cookies(headers: Mapping[str, str]) -> dict[str, str]:
    return cookie_parser(headers.get("cookie", ""))


def has_session(headers: Mapping[str, str], token: bytes) -> bool:
    given = cookies(headers).get(SESSION_COOKIE, "")
    return hmac.compare_digest(given.encode(), session_value(token).encode())


def csrf_key(token: str | None) -> bytes:
    if token:
        return hmac.new(token.encode(), b"celery_ext.ui.csrf.v1", hashlib.sha256).digest()
    return _PROCESS_KEY


def csrf_token(key: bytes, seed: str) -> str:
    return hmac.new(key, seed.encode(), hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, headers: Mapping[str, str]) -> bool:
    seed = cookies(headers).get(CSRF_COOKIE, "")
    given = headers.get(CSRF_HEADER, "")
    return bool(seed) and bool(given) and hmac.compare_digest(given.encode(), csrf_token(key, seed).encode())


def new_seed() -> str:
    return secrets.token_hex(16)


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path only (never another site)."""
    if target and is_ui(target.split("?", 1)[0]) and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/tasks"


def refusal(scope: Scope, headers: Mapping[str, str], token: bytes) -> Response | None:
    """``Gate``'s answer for a ``/ui`` request without a valid bearer header: None to let it
    through (an open path, or a valid session cookie), else a redirect to the login form (a page)
    or a 401 telling htmx to go there (a fragment or a POST)."""
    path: str = scope["path"]
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or has_session(headers, token):
        return None
    query = scope.get("query_string", b"").decode("latin-1")
    login = "/ui/login?next=" + quote(path + ("?" + query if query else ""), safe="")
    if scope["method"] in ("GET", "HEAD") and "hx-request" not in headers:
        return RedirectResponse(login, status_code=303)
    return HTMLResponse(
        '<p class="flash error">Your session has ended: <a href="/ui/login">log in</a>.</p>',
        status_code=401,
        headers={"HX-Redirect": login},
    )

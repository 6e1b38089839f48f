"""Bearer-token authentication of the mixer API.

The tokens a mixer accepts are ``auth.tokens`` of its config plus ``$HOME_MIXER_API_TOKENS``
(comma-separated), merged: several at once, so a key rotates without downtime (add the new one,
move the clients, remove the old one). When neither names a token, the mixer accepts the state
folder's token, ``<state>/run/mixer-api-token``: 32 random bytes generated on first use with mode
0600, which the clients of that state folder (demo, benches, tests) read too. ``auth.enabled:
false`` turns authentication off (for a mixer behind an authenticating gateway) with a warning.

Tokens are compared in constant time against every accepted token and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.state import StateDir

if TYPE_CHECKING:
    from mixer.config import AuthSettings

log = logging.getLogger(__name__)

TOKENS_ENV = "HOME_MIXER_API_TOKENS"
STATE_TOKEN_FILE = "mixer-api-token"
MIN_TOKEN_LENGTH = 16


class AuthConfigError(ValueError):
    """A token is unusable (too short, or not header-safe) or the state token file is unsafe; the
    message says what to change (and never holds the token)."""


def check_token(token: str, where: str) -> str:
    """``token`` if it can be a bearer token: >= 16 characters, printable ASCII, no spaces or commas.

    Raises:
        AuthConfigError: naming ``where`` the token came from (not the token itself).
    """
    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthConfigError(f"a token in {where} has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                              "random ones (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if not all(33 <= ord(c) <= 126 and c != "," for c in token):
        raise AuthConfigError(f"a token in {where} holds a space, a comma or a non-ASCII character; "
                              "use URL-safe characters only")
    return token


def tokens_from_env(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The tokens of ``$HOME_MIXER_API_TOKENS`` (comma-separated; blanks ignored), in order.

    Raises:
        AuthConfigError: one of them is unusable (:func:`check_token`).
    """
    text = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
    return tuple(check_token(t.strip(), f"${TOKENS_ENV}") for t in text.split(",") if t.strip())


def state_token_path(state: StateDir) -> Path:
    """``<state>/run/mixer-api-token``."""
    return state.run / STATE_TOKEN_FILE


def state_token(state: StateDir) -> str:
    """The state folder's token, generated (mode 0600) if the folder has none yet.

    Raises:
        AuthConfigError: the file is readable by group or others (``chmod 600`` it), or not a token.
    """
    path = state_token_path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # written whole to a private temp file, then linked into place: link fails if the file
        # exists, so processes starting together (a mixer's workers, a client) agree on one token
        # and none ever reads a half-written one
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mixer-api-token.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise AuthConfigError(f"{path} is readable by other users; run `chmod 600 {path}`")
    return check_token(path.read_text().strip(), str(path))


def accepted_tokens(settings: AuthSettings, state: StateDir | None = None) -> tuple[str, ...]:
    """The tokens a mixer accepts: config plus ``$HOME_MIXER_API_TOKENS``, else the state folder's
    token (``state``, default ``$HOME_MIXER_STATE``); ``()`` when ``settings.enabled`` is false.

    Raises:
        AuthConfigError: an unusable token in the environment or an unsafe state token file.
    """
    if not settings.enabled:
        return ()
    tokens = tuple(dict.fromkeys([*(t.get_secret_value() for t in settings.tokens), *tokens_from_env()]))
    return tokens or (state_token(state or StateDir.from_env()),)


def client_token(state: StateDir | None = None) -> str:
    """The token a client of this repository sends: the first of ``$HOME_MIXER_API_TOKENS``, else
    the state folder's (generated if missing, so it matches a mixer of the same state folder).

    Raises:
        AuthConfigError: see :func:`tokens_from_env` and :func:`state_token`.
    """
    env = tokens_from_env()
    return env[0] if env else state_token(state or StateDir.from_env())


def auth_headers(state: StateDir | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <client_token>"}`` for httpx / requests calls to a mixer."""
    return {"Authorization": f"Bearer {client_token(state)}"}


class TokenVerifier:
    """Constant-time membership of a presented token in the accepted ones."""

    def __init__(self, tokens: Iterable[str]):
        self._tokens = tuple(t.encode() for t in tokens)
        if not self._tokens:
            raise ValueError("TokenVerifier needs at least one token")

    def accepts(self, presented: str) -> bool:
        """True when ``presented`` equals one of the tokens; compares with every one of them, so the
        time taken says neither which token matched nor how much of it."""
        data = presented.encode("utf-8", "surrogateescape")
        found = False
        for token in self._tokens:
            found |= hmac.compare_digest(data, token)
        return found


def scope_token(scope) -> str:
    """The bearer token of an ASGI request scope ('' when there is none); for checks that run
    before routing (``mixer.admission``)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def bearer_dependency(tokens: Iterable[str]) -> Callable:
    """A FastAPI dependency requiring ``Authorization: Bearer <one of tokens>`` (and declaring the
    OpenAPI security scheme): 401 with ``WWW-Authenticate: Bearer`` without a bearer token, 403 with
    a wrong one."""
    verifier = TokenVerifier(tokens)
    scheme = HTTPBearer(auto_error=False, scheme_name="bearer",
                        description="`Authorization: Bearer <token>`: a token of `auth.tokens` / "
                                    f"${TOKENS_ENV}, or the state folder's run/{STATE_TOKEN_FILE}")

    def require_token(request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        where = f"{request.method} {request.url.path} from {request.client.host if request.client else '?'}"
        if credentials is None or not credentials.credentials:
            log.info("rejected %s: no bearer token", where)
            raise HTTPException(401, "missing bearer token: send `Authorization: Bearer <token>`",
                                headers={"WWW-Authenticate": "Bearer"})
        if not verifier.accepts(credentials.credentials):
            log.info("rejected %s: unknown bearer token", where)  # never the token itself
            raise HTTPException(403, "the bearer token is not accepted by this mixer")

    return require_token

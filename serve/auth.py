"""Who is calling: FastAPI dependencies for the user and for operators.

Keys are required as soon as one exists, and always when the gateway listens beyond
loopback (it refuses to start that way without a key). In open (local) mode a caller may
name itself with the `X-Loopchat-User` header (the browser UI gives each session its own),
and everyone may use the admin API; any bearer token is ignored there.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from serve.errors import APIError

OPEN_MODE_USER = "local"


@dataclass(frozen=True)
class User:
    name: str
    admin: bool


def current_user(request: Request) -> User:
    state = request.app.state
    if not (state.keys_required or state.store.key_count() > 0):
        # Open mode: any bearer token (the openai SDK always sends one) is ignored.
        name = request.headers.get("x-loopchat-user", "").strip()[:128] or OPEN_MODE_USER
        return User(name, admin=True)
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not key:
        raise APIError(401, "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
                       code="missing_api_key")
    found = state.store.lookup_key(key)
    if not found:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return User(found["user"], bool(found["admin"]))


def require_admin(user: User = Depends(current_user)) -> User:
    if not user.admin:
        raise APIError(403, "This endpoint needs an admin key.", code="admin_required")
    return user

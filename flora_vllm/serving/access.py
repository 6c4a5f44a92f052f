"""Who may do what: allowed adapter roots and an API key on every endpoint (no vLLM import).

An operator who lets tenants load adapters at runtime (`/v1/load_lora_adapter`) must not let them
read arbitrary files of the server. With roots set (FLORA_ADAPTER_ROOTS), an adapter path must be
a local folder that resolves inside a root, and so must every file in it: `..` tricks and
symlinks pointing outside are refused, as are hub ids and URLs (they would be downloaded).

Runs in: the API server (middleware, load checks), the worker (load checks) and the Ray app.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from flora_vllm.adapter.files import entries, inside

REFUSED = "outside the allowed adapter roots"  # every refusal says it (tests and clients match)


class AdapterPathRefusedError(PermissionError):
    """An adapter path the allowed roots forbid; the API server answers 403."""


def check_adapter_path(path: str, roots: Sequence[str]) -> None:
    """Raise AdapterPathRefusedError unless `path` and every file under it resolve inside one
    of `roots` (already resolved with realpath), ValueError for a null byte. No roots: anything
    goes."""
    if not roots:
        return
    if "\x00" in path:  # a malformed request rather than a path outside the roots
        raise ValueError("adapter path contains a null byte")
    where = f"adapter path {path!r} is {REFUSED} ({os.pathsep.join(roots)})"
    if not path:
        raise AdapterPathRefusedError(f"{where}: not a local folder path")
    local = os.path.expanduser(path)
    if "://" in path or not (os.path.isabs(local) or os.path.exists(local)):  # vLLM would fetch
        raise AdapterPathRefusedError(f"{where}: only local folders, not hub ids or URLs")
    real = os.path.realpath(local)
    if not inside(real, roots):
        raise AdapterPathRefusedError(f"{where}: it resolves to {real!r}")
    if not os.path.isdir(real):
        return  # inside a root but missing: the loader answers 404 as usual
    for rel, full in entries(real):  # FolderLimitError (a ValueError): too many, too deep
        target = os.path.realpath(full)
        if not inside(target, roots):
            raise AdapterPathRefusedError(f"{where}: {rel!r} links to {target!r}")


def find_adapter_folder(name: str, roots: Sequence[str]) -> str | None:
    """`<root>/<name>` in the first root that has it, for a model name nobody registered (the
    resolver serves it on first use); None where no root has it. Raises AdapterPathRefusedError
    when it leads outside the roots (`..`, an absolute name, a symlink), ValueError for a null
    byte. What the folder holds is the loader's to check (a broken one is a 400 there)."""
    if "\x00" in name:
        raise ValueError("adapter name contains a null byte")
    for root in roots:
        path = os.path.join(root, name)
        if os.path.lexists(path):
            check_adapter_path(path, roots)
            return path
    if roots and (os.path.isabs(name) or ".." in name.split("/")):  # missing too, but a 403
        check_adapter_path(os.path.join(roots[0], name), roots)  # says why it can never be
    return None


PUBLIC_PATHS = ("/health",)  # liveness probes carry no data and no key


class ApiKeyMiddleware:
    """ASGI middleware: with `--api-key`, every path needs `Authorization: Bearer <key>` except
    PUBLIC_PATHS. vLLM's own check guards `/v1`-style prefixes only, which leaves `/metrics`
    (adapter names), `/tokenize` and the dev endpoints open."""

    def __init__(self, app: Any, tokens: Sequence[str]) -> None:
        self.app = app
        self._hashes = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def _authorized(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(key.encode()).digest()
        return any([secrets.compare_digest(digest, h) for h in self._hashes])  # no short-circuit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path not in PUBLIC_PATHS and not self._authorized(
                Headers(scope=scope).get("authorization")
            ):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = {"error": {"message": "Unauthorized: send 'Authorization: Bearer <api key>'",
                                  "type": "AuthenticationError", "code": 401}}
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)

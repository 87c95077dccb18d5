"""Refuse request bodies whose strings cannot be encoded as UTF-8, with a 400 naming the field.

JSON can carry a lone UTF-16 surrogate (``"\\ud800"``); Python's parser turns it into a ``str``
that UTF-8 cannot encode.  vLLM 0.32's front end passes such a string on, and it fails where it
is first encoded: the tokenizer (``TypeError: TextEncodeInput must be ...`` for a text prompt,
``bad_words``, a chat message) or the engine transport (``request_id``).  vLLM maps those to
HTTP 500, for that request alone: a client error answered as a server error, which this
project treats as a defect.  The failure happens before any plugin code sees the request, so
the only hook that can refuse it is the HTTP layer: this pure ASGI middleware reads a POST
body, and when (and only when) it holds a ``\\u`` escape, parses it and looks for a string
that UTF-8 cannot encode.  Everything else passes through untouched, the body replayed as it
came.  A body that is not JSON is left to vLLM (it answers 400 itself).

It is installed by the ``twotower_guard`` endpoint plugin (``VLLM_PLUGINS=...,twotower_guard``)
or by vLLM's own flag, ``--middleware vllm_twotower.engine.text_guard.RefuseUnencodableText``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

from vllm_twotower.engine.stats_endpoint import error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def unencodable_field(value: object, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string UTF-8 cannot encode, if any.

    Keys are checked as well as values; a bad key is reported by its parent's path.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            found = unencodable_field(key, path or "body") or unencodable_field(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unencodable_field(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def body_unencodable_field(body: bytes) -> str | None:
    """:func:`unencodable_field` of a JSON body; ``None`` if it has no escape or is not JSON.

    Raw surrogate bytes are invalid UTF-8, which vLLM's JSON parsing already refuses with 400;
    only the ``\\u`` escape can smuggle a lone surrogate into a parsed string.
    """
    if b"\\u" not in body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return unencodable_field(parsed)


class RefuseUnencodableText:
    """ASGI middleware: a POST body holding a lone surrogate gets 400 naming its field."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        field = body_unencodable_field(body)
        if field is not None:
            response = error(
                400,
                f"{field}: the string holds a lone UTF-16 surrogate, which is not valid "
                "Unicode text (encode text as UTF-8; a surrogate must come in a pair)",
                param=field,
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # after the body, the app only waits for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class TwoTowerGuardPlugin:
    """The ``twotower_guard`` endpoint plugin: installs :class:`RefuseUnencodableText`."""

    name = "twotower_guard"
    #: Every server that parses request bodies, the render server included.
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_middleware(RefuseUnencodableText)

    async def init_state(self, engine_client: object, state: object, args: object) -> None:
        """Nothing to set up: the middleware holds no state."""

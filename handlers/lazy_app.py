"""An ASGI application built on its first request, so the process's cold start (a Lambda's
init) does not pay for routes most requests never reach: `app.mount(prefix, LazyApp(...))`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from importlib import import_module
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class LazyApp:
    """The application `factory` ("package.module:function") returns, built once, on first use."""

    def __init__(self, factory: str) -> None:
        self.factory = factory
        self._app: ASGIApp | None = None

    @property
    def app(self) -> ASGIApp:
        if self._app is None:
            module, _, name = self.factory.partition(":")
            self._app = getattr(import_module(module), name)()
        return self._app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

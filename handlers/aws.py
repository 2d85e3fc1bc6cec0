"""S3 and SQS clients, created once per process (per event loop) and reused.

Under Mangum the ASGI lifespan runs on every invocation, so clients must not be created
there; they live here for the life of the process instead. aiobotocore clients are bound to
the event loop that created them, hence the per-loop cache.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from handlers.settings import Settings, get_settings

_clients: dict[tuple[int, str], Any] = {}
_stacks: dict[int, AsyncExitStack] = {}
_locks: dict[int, asyncio.Lock] = {}


def _client_config(settings: Settings) -> Any:
    # Imported on first use: aiobotocore + aiohttp + botocore are most of a cold start's imports,
    # and /healthz (or a rejected request) never needs them.
    from aiobotocore.config import AioConfig

    return AioConfig(
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=settings.s3_max_concurrency,
        connect_timeout=5,
        read_timeout=30,
        # SigV4 everywhere: presigned PUTs then carry x-amz-tagging as a signed header
        # (the legacy signer moves it to the query string, where S3 ignores it).
        signature_version="s3v4",
    )


async def _client(service: str) -> Any:
    from aiobotocore.session import get_session

    loop = asyncio.get_running_loop()
    key = (id(loop), service)
    client = _clients.get(key)
    if client is not None:
        return client
    lock = _locks.setdefault(id(loop), asyncio.Lock())
    async with lock:
        client = _clients.get(key)
        if client is None:
            settings = get_settings()
            stack = _stacks.setdefault(id(loop), AsyncExitStack())
            client = await stack.enter_async_context(
                get_session().create_client(
                    service,
                    region_name=settings.region,
                    endpoint_url=settings.aws_endpoint_url,
                    config=_client_config(settings),
                )
            )
            _clients[key] = client
    return client


async def s3_client() -> Any:
    """The process's S3 client (`handlers.dependencies` wraps it in the stores)."""
    return await _client("s3")


async def sqs_client() -> Any:
    """The process's SQS client (`handlers.dependencies` wraps it in the train queue)."""
    return await _client("sqs")

"""A TCP proxy in front of moto that breaks connections on purpose, so tests can show that S3
and SQS calls survive real network faults (connections reset on connect, connections dropped
after the request was sent but before any response) through botocore's retries, not through mocks."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


@dataclass
class FaultPlan:
    reset_every: int = 3  # every Nth new connection is closed at once
    cut_every: int = 5  # every Nth connection is dropped after the request, before any response
    cut_after: int = 0


class FaultyProxy:
    def __init__(self, target_port: int, plan: FaultPlan) -> None:
        self._target_port = target_port
        self._plan = plan
        self.connections = 0
        self.resets = 0
        self.cuts = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FaultyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        if self._plan.reset_every and n % self._plan.reset_every == 0:
            self.resets += 1
            writer.transport.abort()
            return
        cut = self._plan.cut_every and n % self._plan.cut_every == 0
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
            sent = 0
            try:
                while data := await src.read(65536):
                    if limit is not None and sent + len(data) > limit:
                        dst.write(data[: max(0, limit - sent)])
                        self.cuts += 1
                        break
                    dst.write(data)
                    sent += len(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort() if limit is not None else dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, None),
            pipe(up_reader, writer, self._plan.cut_after if cut else None),
            return_exceptions=True,
        )
        writer.transport.abort()
        up_writer.transport.abort()

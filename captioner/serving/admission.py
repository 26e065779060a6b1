"""Admission: how many uploads the server holds at once, and how long one may take to arrive.

A request is counted from its headers, before any of its body is read, so the server's memory does not grow with
the number of clients: past the limit, the body is read and thrown away (so the client can read the answer; a
client that sent `Expect: 100-continue` never sends it) and the answer is 503 with Retry-After.
"""
import asyncio
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from captioner.serving.uploads import BodyLimit


class Admission:
    """ASGI middleware: at most `limit` POST requests in flight; each body must arrive within `timeout_s` (408)."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        self.active = 0  # one event loop: a plain counter is race-free

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            return await self.refuse(scope, receive, send)
        self.active += 1
        deadline = time.monotonic() + self.timeout_s

        async def timed_receive():
            try:
                return await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise HTTPException(408, f"the upload took longer than {self.timeout_s:g} s; send it again, "
                                         f"or a smaller image") from None
        try:
            await self.app(scope, timed_receive, send)
        finally:
            self.active -= 1

    async def refuse(self, scope, receive, send):
        expects = dict(scope["headers"]).get(b"expect", b"").lower() == b"100-continue"
        try:  # a slow body is given up on, like an admitted one
            drained = not expects and await asyncio.wait_for(BodyLimit.drain(receive, 0), self.timeout_s)
        except TimeoutError:
            drained = False
        headers = {"Retry-After": "1"} | ({} if drained else {"Connection": "close"})
        detail = f"the server is busy ({self.limit} uploads in progress); retry shortly"
        await JSONResponse({"detail": detail}, 503, headers=headers)(scope, receive, send)


class HeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, where a request's headers must arrive within `timeout_keep_alive` seconds of the
    connection or of the previous answer. uvicorn's own timer starts only after an answer and stops at any byte,
    so a connection never used, or one trickling its headers, stayed open forever."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.deadline = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data):
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self.deadline.cancel()  # the headers are in; the body has upload_timeout_s

    def on_response_complete(self):
        super().on_response_complete()
        self.deadline.cancel()
        if self.cycle.response_complete and not self.transport.is_closing():  # no pipelined request started
            self.deadline = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc):
        self.deadline.cancel()
        super().connection_lost(exc)

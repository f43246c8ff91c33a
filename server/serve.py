"""Runs the app under Hypercorn, configured from code, with a graceful shutdown.

On SIGTERM or SIGINT: new requests get 503 (and /health/ready turns 503, so a load balancer
moves on), in-flight generations and embeddings may finish for up to `shutdown_grace_s`, then
the rest end with a final error event ("the server is shutting down") and `[DONE]`; Hypercorn
then closes the connections and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from quart import Quart

from inference.errors import BackendUnavailable
from server.app import create_app
from server.core.state import AppState
from server.settings import Settings

log = logging.getLogger(__name__)
FLUSH_S = 2.0  # time for streams to write their final events after stop_all


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.loglevel = settings.log_level.upper()
    # Hypercorn formats an access line for every request whenever it has a logger, so give it
    # one only when the level will print it.
    verbose = settings.log_level.lower() in ("debug", "info")
    config.accesslog = logging.getLogger("hypercorn.access") if verbose else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.websocket_ping_interval = settings.ws_ping_interval_s
    # Idle keep-alive connections close; a response that is still streaming never does
    # (no read timeout: an SSE client sends nothing while it listens).
    config.keep_alive_timeout = settings.keep_alive_timeout_s
    # Past this the frame is a protocol violation (close 1009); below it, messages over
    # ws_max_message_bytes get an error event and the socket stays open.
    config.websocket_max_message_size = 16 * 1024 * 1024
    # h11 answers 431 by itself once an unfinished request head outgrows this buffer, even
    # while the client is still sending it; the client then fails on a broken pipe and never
    # reads the answer. With room for 8x the app's limit, a head up to that size arrives whole
    # and the app refuses it (431 with an OpenAI body) after it has been read.
    config.h11_max_incomplete_size = 8 * settings.max_header_bytes
    config.graceful_timeout = FLUSH_S + 1.0  # drain happens before; this closes connections
    return config


async def _idle_within(state: AppState, seconds: float) -> bool:
    # Polled: shutdown happens once, and engines need no idle-notification plumbing for it.
    deadline = asyncio.get_running_loop().time() + seconds
    while not state.registry.idle():  # noqa: ASYNC110
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def drain(state: AppState, grace_s: float) -> None:
    """Refuse new work, let in-flight work finish for `grace_s`, then end the rest."""
    state.draining = True
    log.info("shutting down: in-flight requests may finish for up to %.0f s", grace_s)
    if not await _idle_within(state, grace_s):
        log.warning("grace period over: ending the remaining requests")
        state.registry.stop_all(BackendUnavailable("the server is shutting down"))
        await _idle_within(state, FLUSH_S)
    await asyncio.sleep(0.2)  # let the last responses write their final events
    for connection in list(state.sockets):  # WebSockets close with 1001 "going away"
        connection.cancel()
    await asyncio.sleep(0.1)


def _quiet_cancelled_connections(loop: asyncio.AbstractEventLoop,
                                 context: dict[str, object]) -> None:
    # Hypercorn 0.18's WebSocket ping task sleeps a whole ping interval before it looks at
    # whether its socket has closed, and the connection's task group waits for it. So after a
    # WebSocket closes (TCP included, at once) its connection task lives up to 20 s more; at
    # shutdown Hypercorn's graceful timeout cancels it, and on Python 3.11 asyncio reports the
    # cancelled task as a callback error. Everything else is reported as usual.
    if isinstance(context.get("exception"), asyncio.CancelledError):
        log.debug("connection cancelled at shutdown")
        return
    loop.default_exception_handler(context)


async def serve_until_signalled(app: Quart, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_cancelled_connections)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state: AppState = app.extensions["npugate"]

    async def shutdown_trigger() -> None:
        await stop.wait()
        await drain(state, settings.shutdown_grace_s)

    await hypercorn_serve(app, hypercorn_config(settings), shutdown_trigger=shutdown_trigger)
    log.info("stopped")


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    asyncio.run(serve_until_signalled(create_app(settings), settings))

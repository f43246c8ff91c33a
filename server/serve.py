"""Runs the app under Hypercorn, configured from code."""

from __future__ import annotations

import asyncio
import logging

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from server.app import create_app
from server.settings import Settings


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.loglevel = settings.log_level.upper()
    # Route Hypercorn's logs through the root logger `serve` configured, so each line is
    # written once, in one format.
    # Hypercorn formats an access line for every request whenever it has a logger, so give it
    # one only when the level will print it.
    verbose = settings.log_level.lower() in ("debug", "info")
    config.accesslog = logging.getLogger("hypercorn.access") if verbose else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.websocket_ping_interval = settings.ws_ping_interval_s
    # Past this the frame is a protocol violation (close 1009); below it, messages over
    # ws_max_message_bytes get an error event and the socket stays open.
    config.websocket_max_message_size = 16 * 1024 * 1024
    return config


def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM (Hypercorn installs the handlers)."""
    app = create_app(settings)
    asyncio.run(hypercorn_serve(app, hypercorn_config(settings)))

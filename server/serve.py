"""Runs the app under Hypercorn, configured from code."""

from __future__ import annotations

import asyncio

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from server.app import create_app
from server.settings import Settings


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.loglevel = settings.log_level.upper()
    config.accesslog = "-"
    config.errorlog = "-"
    return config


def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM (Hypercorn installs the handlers)."""
    app = create_app(settings)
    asyncio.run(hypercorn_serve(app, hypercorn_config(settings)))

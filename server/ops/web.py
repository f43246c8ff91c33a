"""The browser chat page: `clients/web/` at `/` (assets under `/static/`). No CDN: it works
offline. Quart's static handler joins paths safely, so nothing outside that folder is served."""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory

WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"
bp = Blueprint("web", __name__, static_folder=str(WEB_DIR), static_url_path="/static")


@bp.get("/")
async def index() -> Response:
    return await send_from_directory(WEB_DIR, "index.html")

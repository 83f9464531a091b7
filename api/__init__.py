"""The HTTP API (FastAPI, served by uvicorn): ``create_app(db, ...)`` in ``api.app``; ``lorasearch serve`` runs it."""
from __future__ import annotations

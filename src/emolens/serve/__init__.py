"""`emolens serve`: an OpenAI-compatible HTTP server with live emotion readouts, per-request
steering, guards and a browser dashboard (needs the `serve` extra: FastAPI, uvicorn,
sse-starlette).

    from emolens.serve import Settings, create_app
    app = create_app(lm, bank, Settings(api_key="secret"))   # an ASGI app for uvicorn
"""

from __future__ import annotations

from emolens.serve.app import Settings, create_app
from emolens.serve.protocol import Defaults, Limits

__all__ = ["Defaults", "Limits", "Settings", "create_app"]

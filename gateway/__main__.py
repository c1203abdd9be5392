"""`python -m gateway`: serve the gateway with uvicorn (127.0.0.1:8000 unless LORAFN_GATEWAY__HTTP__HOST/PORT).

Settings come from the environment (LORAFN_ prefix, `__` between sections), read here and nowhere below.
"""

from __future__ import annotations

import logging


def main() -> None:
    """Build the settings from the environment and run the app."""
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from protocol.heap import freeze_startup_heap

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings()
    http = settings.gateway.http
    app = create_app(settings)
    freeze_startup_heap()  # FastAPI, SQLAlchemy, pydantic and the routes are built
    uvicorn.run(app, host=http.host, port=http.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()

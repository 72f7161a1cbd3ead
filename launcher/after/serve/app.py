"""The HTTP server (aiohttp): POST /infer, GET /health, GET /metrics.

Each request is checked on arrival (a bad one gets a 4xx with a message and never reaches a batch),
queued to the batcher, and answered individually with JSON. A client that disconnects only loses
its own answer.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web

from launcher.after.serve.batcher import Batcher
from launcher.after.serve.engine import RequestError
from launcher.config.schema import ServeConfig

log = logging.getLogger("launcher.serve")
BATCHER = web.AppKey("batcher", Batcher)


def build_app(engine: Any, cfg: ServeConfig, info: dict[str, Any]) -> web.Application:
    """The aiohttp application; its batcher starts and stops with the app."""
    app = web.Application(client_max_size=cfg.max_request_bytes)

    async def start_batcher(app: web.Application) -> None:
        app[BATCHER] = Batcher(engine.run_batch, cfg.max_batch_size, cfg.max_wait_ms)
        app[BATCHER].start()

    async def stop_batcher(app: web.Application) -> None:
        await app[BATCHER].stop()

    async def infer(request: web.Request) -> web.Response:
        batcher = request.app[BATCHER]
        start = time.perf_counter()
        try:
            try:
                body = await request.json(loads=json.loads)
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(f"body is not valid JSON ({err})") from None
            item = engine.parse(body)
        except RequestError as err:
            batcher.stats.requests["rejected"] += 1
            return web.json_response({"error": str(err)}, status=err.status)
        try:
            answer = await batcher.submit(item)
        except Exception as err:  # noqa: BLE001 - reported to this client only
            batcher.stats.requests["failed"] += 1
            log.exception("batch failed")
            return web.json_response({"error": f"inference failed: {type(err).__name__}: {err}"}, status=500)
        batcher.stats.requests["ok"] += 1
        batcher.stats.latencies_s.append(time.perf_counter() - start)
        return web.json_response(answer)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **info})

    async def metrics(request: web.Request) -> web.Response:
        batcher = request.app[BATCHER]
        return web.json_response(batcher.stats.snapshot(batcher.queue.qsize()))

    app.router.add_post("/infer", infer)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(start_batcher)
    app.on_cleanup.append(stop_batcher)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner (call `cleanup()` to stop) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound

"""python -m launcher.serve RUN_DIR_OR_EXPORT [checkpoint=step_N] [serve.max_batch_size=8 ...]

    python -m launcher.serve runs/gpt/<id> serve.port=8000 serve.max_batch_size=8 serve.max_wait_ms=5
    curl -s localhost:8000/infer -d '{"prompt": "def main(", "max_new_tokens": 16}'
    curl -s localhost:8000/health; curl -s localhost:8000/metrics

Serves a run directory's checkpoint (newest, or `checkpoint=`) or an export of it, on GPU when present
(`serve.device`). Prints `serving on http://HOST:PORT` once it accepts requests (and writes the port
to `serve.port_file`); SIGTERM or SIGINT stops it. Exit codes: 0 stopped; 2 bad input (config,
checkpoint, recipe), with one line naming it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from launcher.after.serve.app import build_app, start_server
from launcher.after.serve.engine import build_engine, pick_device
from launcher.after.trained import load_trained, parse_overrides
from launcher.config.schema import ServeConfig
from launcher.errors import ConfigError
from launcher.train.checkpoint import CheckpointError

log = logging.getLogger("launcher.serve")
EXIT_BAD_INPUT = 2
USAGE = "python -m launcher.serve RUN_DIR_OR_EXPORT [checkpoint=step_N] [serve.port=8000] ..."


def check_serve_config(cfg: ServeConfig) -> None:
    """Raise ConfigError for the first out-of-range serve.* value."""
    for name in ("max_batch_size", "max_new_tokens", "max_request_bytes"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"serve.{name}", getattr(cfg, name), "must be >= 1")
    if cfg.max_wait_ms < 0:
        raise ConfigError("serve.max_wait_ms", cfg.max_wait_ms, "must be >= 0", "0 = never wait for company")
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(
                "serve.device", cfg.device, "not a device", "use auto, cpu, cuda or cuda:<k>"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "serve.device", cfg.device, "CUDA is not available here", "use serve.device=cpu"
            )
    if not 0 <= cfg.port < 65536:
        raise ConfigError("serve.port", cfg.port, "must be in [0, 65535]", "0 picks a free port")


def parse_args(argv: list[str], usage: str = USAGE) -> tuple[str, ServeConfig, dict[str, str]]:
    """(path, serve config, {checkpoint, recipe}) from argv; raises ConfigError."""
    positional = [a for a in argv if "=" not in a]
    if len(positional) != 1:
        raise ConfigError("RUN_DIR_OR_EXPORT", " ".join(positional), "expected exactly one path", usage)
    sections, plain = parse_overrides([a for a in argv if "=" in a], {"serve": ServeConfig})
    unknown = set(plain) - {"checkpoint", "recipe"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(key, plain[key], "unknown option", "use checkpoint=, recipe= or serve.<key>=")
    check_serve_config(sections["serve"])
    return positional[0], sections["serve"], plain


async def serve(engine, cfg: ServeConfig, info: dict) -> None:
    """Serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner, port = await start_server(build_app(engine, cfg, info), cfg.host, cfg.port)
    if cfg.port_file:  # written atomically: a reader never sees a half-written number
        tmp = Path(f"{cfg.port_file}.tmp")
        tmp.write_text(str(port))
        os.replace(tmp, cfg.port_file)
    print(f"serving on http://{cfg.host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path, cfg, plain = parse_args(argv)
        trained = load_trained(path, plain.get("checkpoint"), plain.get("recipe"))
    except (ConfigError, CheckpointError) as err:
        print(f"launcher.serve: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    device = pick_device(cfg.device)
    model = trained.model.to(device).eval()
    engine = build_engine(model, trained.recipe, cfg, device)
    info = {
        "source": str(trained.source),
        "recipe": trained.recipe_path,
        "kind": engine.kind,
        "device": str(device),
        "max_batch_size": cfg.max_batch_size,
        "max_wait_ms": cfg.max_wait_ms,
    }
    log.info("loaded %s (step %d) on %s; %s engine", trained.source, trained.step, device, engine.kind)
    asyncio.run(serve(engine, cfg, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

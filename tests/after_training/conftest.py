"""Trained runs shared by the after-training tests (each trained once per session), and servers.

`ServerProcess` is the real `python -m launcher.serve` CLI in a subprocess, stopped by its pid;
`InProcessServer` runs the same aiohttp app in a thread of the test process (no second torch import),
for measurements that need several servers. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from launcher.after.serve.app import build_app, start_server
from launcher.after.serve.engine import build_engine
from launcher.after.trained import load_trained
from launcher.config.schema import ServeConfig
from tests.conftest import DIGITS_150, REPO, assert_ok, launch

# A 2-layer byte GPT, 60 steps: a few seconds on 2 cores; enough structure for greedy text to vary.
GPT_SMALL = [
    "recipe=gpt",
    "recipe.model.d_model=64",
    "recipe.model.n_layers=2",
    "recipe.model.n_heads=2",
    "recipe.model.seq_len=64",
    "recipe.data.max_bytes=400000",
    "train.steps=60",
    "train.micro_batch_size=16",
    "optim.lr=3e-3",
    "train.eval_every=60",
    "train.eval_batches=4",
    "train.log_every=20",
    "checkpoint.every=0",
]
STARTUP_TIMEOUT_S = 60
# Fast export settings: few latency repeats, two batch sizes.
FAST_EXPORT = ["export.latency_repeats=2", "export.latency_batch_sizes=[1,8]"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: a second intra-op thread only spins (and the CI machine has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("digits")
    result = launch(DIGITS_150, tmp, timeout=120)
    assert_ok(result)
    return result.run_dir


@pytest.fixture(scope="session")
def gpt_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gpt")
    result = launch(GPT_SMALL, tmp, timeout=120)
    assert_ok(result)
    return result.run_dir


@pytest.fixture(scope="session")
def digits_export(digits_run, tmp_path_factory) -> tuple[Path, dict]:
    """The digits run pruned by 0.3 and int8-quantized: (export dir, its report)."""
    pytest.importorskip("torchao", reason="int8 export uses torchao")
    from launcher.after import export

    out = tmp_path_factory.mktemp("digits_export") / "int8"
    args = [str(digits_run), "export.prune_amount=0.3", f"export.out={out}", *FAST_EXPORT]
    assert export.main(args) == 0
    return out, json.loads((out / "export_report.json").read_text())


def cli_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class ServerProcess:
    """`python -m launcher.serve PATH args...` on a free port; `url` once /health answers."""

    def __init__(self, path: Path, args: list[str], tmp: Path) -> None:
        self.port_file, self.log_path = tmp / "port", tmp / "server.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launcher.serve",
                str(path),
                "serve.port=0",
                f"serve.port_file={self.port_file}",
            ]
            + args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            cwd=tmp,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"server did not start (exit {self.proc.returncode}):\n{self.log_path.read_text()}"
                )
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port_file.read_text()}"
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


class InProcessServer:
    """The serve app for an already-loaded model, on a free port, in a background thread."""

    def __init__(self, path: Path, cfg: ServeConfig) -> None:
        trained = load_trained(path)
        engine = build_engine(trained.model, trained.recipe, cfg, torch.device("cpu"))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner, self.port = self.loop.run_until_complete(
                start_server(build_app(engine, cfg, {"kind": engine.kind}), "127.0.0.1", 0)
            )
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(STARTUP_TIMEOUT_S):
            pytest.fail("in-process server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

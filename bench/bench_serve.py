"""Serving throughput and latency of `python -m launcher.serve` at several max_batch_size values.

    python bench/bench_serve.py                  # gpt2_small shape on the GPU, batch 1/8/32 (~2 min)
    python bench/bench_serve.py --quick          # fewer requests (~1 min)
    python bench/bench_serve.py --shape tiny --sizes 1,8 --clients 16   # a CPU smoke run

Makes a run directory with a gpt2_small-shaped GPT (vocab 50304, 1024 context, 768 wide, 12 layers)
with RANDOM weights (seed 0; the launcher's own init, written in the checkpoint format: no training,
no data), then for each size starts the real server as a subprocess, sends `--requests` requests from
`--clients` concurrent aiohttp clients (each prompt `--prompt-len` tokens, `--new-tokens` generated
greedily), and stops it by pid. Prints a markdown table: requests/s, generated tokens/s, client-side
p50/p99 latency, the server's mean batch size. Every wait is bounded; a server that fails to start
has its log printed and the bench exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "gpt2_small": {"vocab_size": 50304, "seq_len": 1024, "d_model": 768, "n_layers": 12, "n_heads": 12},
    "tiny": {"vocab_size": 256, "seq_len": 128, "d_model": 64, "n_layers": 2, "n_heads": 2},
}
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120


def say(*parts: object) -> None:
    print(*parts, flush=True)


def make_run_dir(root: Path, shape: str) -> Path:
    """A run directory in the launcher's layout holding the shape's initial (random) weights."""
    from launcher.train.checkpoint import sha256
    from recipes.gpt import GPTConfig, GPTModelConfig, GPTRecipe

    run_dir = root / f"gpt_{shape}"
    ckpt = run_dir / "checkpoints" / "step_0"
    ckpt.mkdir(parents=True, exist_ok=True)
    cfg = GPTConfig(model=GPTModelConfig(**SHAPES[shape]))
    torch.manual_seed(0)
    torch.save(GPTRecipe(cfg).build_model().state_dict(), ckpt / "model.pt")
    meta = {"step": 0, "files": {"model.pt": sha256(ckpt / "model.pt")}, "recipe": "recipes.gpt:GPTRecipe"}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.create({"recipe": OmegaConf.structured(cfg)}))
    )
    return run_dir


class Server:
    def __init__(self, run_dir: Path, size: int, args: argparse.Namespace, workdir: Path) -> None:
        self.port_file, self.log_path = workdir / f"port_{size}", workdir / f"server_{size}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            "-m",
            "launcher.serve",
            str(run_dir),
            "serve.port=0",
            f"serve.port_file={self.port_file}",
            f"serve.max_batch_size={size}",
            f"serve.max_wait_ms={args.max_wait_ms}",
            f"serve.max_new_tokens={args.new_tokens}",
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                say(f"server (max_batch_size={size}) did not start; exit {self.proc.returncode}; its log:")
                say(self.log_path.read_text()[-5000:])
                sys.exit(1)
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port_file.read_text()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()


async def load(url: str, args: argparse.Namespace, vocab: int) -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    rng = random.Random(0)
    bodies = [
        {"tokens": [rng.randrange(vocab) for _ in range(args.prompt_len)], "max_new_tokens": args.new_tokens}
        for _ in range(args.requests)
    ]
    latencies: list[float] = []
    answers: list[list[int] | None] = [None] * len(bodies)
    queue: asyncio.Queue = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/health") as response:
            health = await response.json()

        async def warm() -> None:
            async with session.post(f"{url}/infer", json=bodies[0]) as response:
                assert response.status == 200, await response.text()

        await warm()  # CUDA context, first kernels: not measured

        async def client() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                start = time.perf_counter()
                async with session.post(f"{url}/infer", json=bodies[index]) as response:
                    answer = await response.json()
                    assert response.status == 200, answer
                latencies.append(time.perf_counter() - start)
                answers[index] = answer["tokens"]

        start = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(client() for _ in range(args.clients))), REQUEST_TIMEOUT_S * 2
        )
        elapsed = time.perf_counter() - start
        async with session.get(f"{url}/metrics") as response:
            metrics = await response.json()
    latencies.sort()
    return {
        "device": health["device"],
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": len(latencies) * args.new_tokens / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
        "mean_batch_size": metrics["mean_batch_size"],
        "elapsed_s": elapsed,
        "answers": answers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2_small")
    parser.add_argument("--sizes", default="1,8,32", help="max_batch_size values")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=192, help="requests per size")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="96 requests per size")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    if args.quick:
        args.requests = 96
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        say("aiohttp is missing: install it (see README 'After training') and rerun")
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_serve_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    say(f"[{time.time() - started:.0f}s] writing a {args.shape} run directory (random weights) in {workdir}")
    run_dir = make_run_dir(workdir, args.shape)
    vocab = min(SHAPES[args.shape]["vocab_size"], 50257)
    rows = []
    for size in sizes:
        say(f"[{time.time() - started:.0f}s] max_batch_size={size}: starting the server")
        server = Server(run_dir, size, args, workdir)
        try:
            say(
                f"[{time.time() - started:.0f}s] max_batch_size={size}: "
                f"{args.requests} requests, {args.clients} clients"
            )
            result = asyncio.run(load(server.url, args, vocab))
        finally:
            server.stop()
        answers = result.pop("answers")
        reference = rows[0]["answers"] if rows else answers
        # Greedy answers equal to the first size's (batch 1): float sums may differ with the batch shape
        # on GPUs, and random weights give near-tied logits, so this is reported, not required.
        result["same_as_first"] = sum(a == b for a, b in zip(answers, reference)) / len(answers)
        rows.append({"max_batch_size": size, **result, "answers": answers})
        say(f"[{time.time() - started:.0f}s] max_batch_size={size}: {json.dumps(result)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    say("")
    say(
        f"{args.shape} (random weights), fp32, {args.clients} concurrent clients, {args.requests} requests, "
        f"prompt {args.prompt_len} + {args.new_tokens} generated tokens, max_wait_ms {args.max_wait_ms}; "
        f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    say("")
    say(
        "| max_batch_size | requests/s | generated tokens/s | p50 ms | p99 ms | mean batch "
        f"| vs batch {sizes[0]} | answers equal to batch {sizes[0]}'s |"
    )
    say("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = rows[0]["requests_per_s"]
    for r in rows:
        say(
            f"| {r['max_batch_size']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch_size']:.1f} "
            f"| {r['requests_per_s'] / base:.2f}x | {r['same_as_first']:.0%} |"
        )
    say(f"\ntotal {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

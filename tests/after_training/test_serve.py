"""launcher.serve / launcher.generate: batched answers equal unbatched ones, batching pays, bad input is
refused while other requests are in flight, and the server outlives clients that go away.

Real HTTP on loopback: aiohttp clients against the real `python -m launcher.serve` (a subprocess,
stopped by its pid) or, for the throughput comparison, the same app in a thread of this process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
import torch

from launcher.after import generate
from launcher.after.serve import cli as serve_cli
from launcher.after.trained import load_trained
from launcher.config.schema import ServeConfig
from tests.after_training.conftest import InProcessServer, ServerProcess

pytestmark = pytest.mark.integration

# 16 prompts of different lengths (1 to 40 bytes), each with its own token budget.
PROMPTS = [
    "d",
    "import os",
    "def main():\n",
    "class Foo(object):\n    def",
    "    return",
    "for i in range(10):\n    print(i)\n",
    "#",
    "if __name__ == '__main__':",
    "x = [",
    "try:\n    pass\nexcept",
    "self.",
    "from collections import",
    "while True:",
    "'''Doc",
    "lambda x: x +",
    "with open(path) as f:\n    data = f.",
]
BUDGETS = [4 + (i * 5) % 17 for i in range(len(PROMPTS))]
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)


@pytest.fixture(scope="module")
def server(gpt_run, tmp_path_factory):
    handle = ServerProcess(
        gpt_run,
        ["serve.max_batch_size=16", "serve.max_wait_ms=100", "serve.max_new_tokens=24"],
        tmp_path_factory.mktemp("server"),
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def reference(gpt_run):
    """Each prompt generated alone (batch of one) in this process."""
    trained = load_trained(gpt_run)
    generator = trained.recipe.generator(trained.model)
    answers = [generator.generate([list(p.encode())], [n])[0] for p, n in zip(PROMPTS, BUDGETS)]
    return trained, generator, answers


async def post_all(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:

        async def one(body: dict) -> tuple[int, dict]:
            async with session.post(f"{url}/infer", json=body) as response:
                return response.status, await response.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def get(url: str, path: str) -> dict:
    async def fetch() -> dict:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            async with session.get(f"{url}{path}") as response:
                assert response.status == 200
                return await response.json()

    return asyncio.run(fetch())


def test_kv_cache_generation_equals_full_recomputation(reference):
    trained, generator, answers = reference
    for prompt, budget, answer in list(zip(PROMPTS, BUDGETS, answers))[:4]:
        ids = torch.tensor([list(prompt.encode())])
        with torch.no_grad():
            for _ in range(budget):
                ids = torch.cat([ids, trained.model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert ids[0, len(prompt.encode()) :].tolist() == answer


def test_concurrent_batched_answers_equal_unbatched(server, reference):
    _, _, answers = reference
    before = get(server.url, "/metrics")
    bodies = [{"prompt": p, "max_new_tokens": n} for p, n in zip(PROMPTS, BUDGETS)]
    results = asyncio.run(post_all(server.url, bodies))
    assert [status for status, _ in results] == [200] * len(PROMPTS)
    assert [body["tokens"] for _, body in results] == answers
    assert all(len(body["tokens"]) == n for (_, body), n in zip(results, BUDGETS))
    after = get(server.url, "/metrics")
    new_batches = after["batches"] - before["batches"]
    assert new_batches < len(PROMPTS)  # they were batched
    assert max(int(size) for size in after["batch_sizes"]) > 1
    assert after["requests"]["ok"] - before["requests"].get("ok", 0) == len(PROMPTS)
    assert after["latency_ms"]["p50"] > 0


def test_malformed_and_disconnecting_clients_while_others_are_in_flight(server, reference):
    _, _, answers = reference

    async def scenario() -> tuple[list, list]:
        good = asyncio.ensure_future(
            post_all(server.url, [{"prompt": p, "max_new_tokens": n} for p, n in zip(PROMPTS, BUDGETS)])
        )
        await asyncio.sleep(0.02)
        # A client that sends a whole request and hangs up before the answer.
        host, port = server.url.removeprefix("http://").split(":")
        raw = socket.create_connection((host, int(port)), timeout=10)
        body = json.dumps({"prompt": "import", "max_new_tokens": 24}).encode()
        raw.sendall(
            b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        raw.close()
        # An aiohttp client that gives up mid-request.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.01)) as session:
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(f"{server.url}/infer", json={"prompt": "def", "max_new_tokens": 24}):
                    pass
        bad = []
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            for data in (
                b'{"prompt": "unterminated',
                b'["not", "an", "object"]',
                json.dumps({"prompt": "x" * 60, "max_new_tokens": 10}).encode(),
                json.dumps({"prompt": "x", "max_new_tokens": 0}).encode(),
                json.dumps({"tokens": [1, 2, 999]}).encode(),
                json.dumps({"prompt": "x", "temperature": 1}).encode(),
            ):
                async with session.post(f"{server.url}/infer", data=data) as response:
                    bad.append((response.status, (await response.json())["error"]))
        return await good, bad

    good, bad = asyncio.run(scenario())
    assert [status for status, _ in good] == [200] * len(PROMPTS)
    assert [body["tokens"] for _, body in good] == answers
    statuses = [status for status, _ in bad]
    assert statuses == [400, 400, 413, 400, 400, 400], bad
    assert "not valid JSON" in bad[0][1]
    assert "too long" in bad[2][1] and "64" in bad[2][1]
    assert "max_new_tokens=0" in bad[3][1]
    assert "[0, 256)" in bad[4][1]
    assert "temperature" in bad[5][1]
    # Still serving, with every request accounted for.
    assert get(server.url, "/health")["status"] == "ok"
    status, body = asyncio.run(post_all(server.url, [{"prompt": PROMPTS[2], "max_new_tokens": BUDGETS[2]}]))[
        0
    ]
    assert status == 200 and body["tokens"] == answers[2]
    metrics = get(server.url, "/metrics")
    assert metrics["requests"]["rejected"] >= 6
    assert server.proc.poll() is None


def test_batching_gives_3x_throughput_with_32_clients(gpt_run, record_property):
    """32 concurrent clients, 2 requests each: requests/s at max_batch_size=8 vs 1 (best of 3 rounds)."""

    async def clients(url: str) -> float:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:

            async def client(i: int) -> None:
                for j in range(2):
                    body = {"prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_new_tokens": 16}
                    async with session.post(f"{url}/infer", json=body) as response:
                        assert response.status == 200

            start = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(32)))
            return 64 / (time.perf_counter() - start)

    # Best of three rounds per size, alternating: on 2 shared cores another process's burst can halve
    # one round (seen in CI: 2.3x under load, 4.8x alone); the best round is the server's own speed.
    throughput = {1: 0.0, 8: 0.0}
    servers = {
        size: InProcessServer(gpt_run, ServeConfig(max_batch_size=size, max_wait_ms=20, max_new_tokens=16))
        for size in (1, 8)
    }
    try:
        for _ in range(3):
            for size, server in servers.items():
                throughput[size] = max(throughput[size], asyncio.run(clients(server.url)))
    finally:
        for server in servers.values():
            server.stop()
    ratio = throughput[8] / throughput[1]
    print(
        f"throughput, 32 clients: {throughput[1]:.1f} req/s at batch 1, {throughput[8]:.1f} at 8: "
        f"{ratio:.2f}x"
    )
    record_property("throughput_ratio_bs8_vs_bs1", ratio)
    assert ratio >= 3.0, throughput


def test_generate_offline_matches_the_server(gpt_run, reference, tmp_path, capsys):
    _, _, answers = reference
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": p, "max_new_tokens": n}) for p, n in zip(PROMPTS, BUDGETS)]
    prompts.write_text("\n".join([*lines, json.dumps({"prompt": ""})]) + "\n")
    code = generate.main(
        [str(gpt_run), "--prompts", str(prompts), "serve.max_batch_size=5", "serve.max_new_tokens=24"]
    )
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2  # the last line is refused; the others are answered
    assert [o["tokens"] for o in out[: len(PROMPTS)]] == answers
    assert out[-1] == {"line": len(PROMPTS) + 1, "error": "prompt must be a non-empty string"}


def test_serving_a_quantized_digits_export(digits_export):
    out, _ = digits_export
    trained = load_trained(out)
    inputs = [trained.recipe.eval_dataset()[i][0] for i in range(6)]
    with torch.no_grad():
        expected = trained.model(torch.stack(inputs)).argmax(-1).tolist()
    server = InProcessServer(out, ServeConfig(max_batch_size=4, max_wait_ms=50))
    try:
        results = asyncio.run(
            post_all(server.url, [{"input": x.tolist()} for x in inputs] + [{"input": [1, 2]}])
        )
    finally:
        server.stop()
    assert [body["prediction"] for _, body in results[:6]] == expected
    assert results[6][0] == 400 and "shape [2]" in results[6][1]["error"]


def test_serve_bad_input_exits_2(gpt_run, tmp_path, capsys):
    assert serve_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert serve_cli.main([str(gpt_run), "serve.max_batch_size=0"]) == 2
    assert "serve.max_batch_size=0" in capsys.readouterr().err
    assert serve_cli.main([str(gpt_run), "serve.max_batch=4"]) == 2
    assert "did you mean max_batch_size" in capsys.readouterr().err
    assert serve_cli.main([str(gpt_run), "serve.device=gpu0"]) == 2
    assert "serve.device=gpu0: not a device" in capsys.readouterr().err

"""python -m launcher.generate RUN_DIR_OR_EXPORT --prompts FILE [serve.max_batch_size=8 ...]: offline.

    python -m launcher.generate runs/gpt/<id> --prompts prompts.txt serve.max_new_tokens=64 > out.jsonl

The same engine and batches as `launcher.serve`, without a server: each line of FILE is a request, either
a JSON object (`{"prompt": ..., "max_new_tokens": ...}`, or `{"input": ...}` for tensor recipes) or
plain text taken as a prompt. Writes one JSON answer per line to stdout, in input order, with the
line number; a bad line gets `{"line": n, "error": ...}` and the others are still answered.
Exit codes: 0 every line answered; 2 bad input (arguments, checkpoint, recipe, a bad line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.after.serve.cli import parse_args
from launcher.after.serve.engine import RequestError, build_engine, pick_device
from launcher.after.trained import load_trained
from launcher.errors import ConfigError
from launcher.train.checkpoint import CheckpointError

EXIT_BAD_INPUT = 2
USAGE = "python -m launcher.generate RUN_DIR_OR_EXPORT --prompts FILE [serve.max_batch_size=8] ..."


def read_requests(path: Path) -> list[object]:
    requests: list[object] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            requests.append(body if isinstance(body, dict) else {"prompt": line})
        except ValueError:
            requests.append({"prompt": line})
    return requests


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        if "--prompts" not in argv or argv.index("--prompts") + 1 >= len(argv):
            raise ConfigError("--prompts", "", "missing", USAGE)
        at = argv.index("--prompts")
        prompts = Path(argv[at + 1])
        del argv[at : at + 2]
        if not prompts.is_file():
            raise ConfigError("--prompts", str(prompts), "no such file", "a file with one prompt per line")
        path, cfg, plain = parse_args(argv, USAGE)
        trained = load_trained(path, plain.get("checkpoint"), plain.get("recipe"))
    except (ConfigError, CheckpointError) as err:
        print(f"launcher.generate: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    device = pick_device(cfg.device)
    engine = build_engine(trained.model.to(device).eval(), trained.recipe, cfg, device)
    answers: dict[int, dict] = {}
    parsed = []
    for line, body in enumerate(read_requests(prompts), start=1):
        try:
            parsed.append((line, engine.parse(body)))
        except RequestError as err:
            answers[line] = {"line": line, "error": str(err)}
    for start in range(0, len(parsed), cfg.max_batch_size):
        chunk = parsed[start : start + cfg.max_batch_size]
        for (line, _), answer in zip(chunk, engine.run_batch([item for _, item in chunk])):
            answers[line] = {"line": line, **answer}
    for line in sorted(answers):
        print(json.dumps(answers[line]), flush=True)
    return EXIT_BAD_INPUT if any("error" in a for a in answers.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

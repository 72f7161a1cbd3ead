"""`python -m launcher.estimate <the overrides of a run>`: predicted GPU memory per rank, no GPU needed.

    python -m launcher.estimate experiment=gpt2_small estimate.gpu=H100
    python -m launcher.estimate experiment=gpt2_small estimate.world_size=4 parallel=pipeline --json
    python -m launcher.estimate experiment=gpt2_small --sweep train.micro_batch_size=1,2,4,8,16,32

Exit codes: 0 it fits; 2 invalid configuration; 5 it does not fit (fixes are printed). With --sweep:
one line per value (peak and whether it fits), exit 0 if any value fits, else 5.
"""

from __future__ import annotations

import json
import logging
import sys

EXIT_CONFIG, EXIT_DOES_NOT_FIT = 2, 5


def estimate_device(cfg) -> tuple[int, str]:
    """What micro_batch_size=auto sizes for here: estimate.gpu, less the CUDA context."""
    from launcher.memory.parts import CUDA_CONTEXT_BYTES, device_bytes

    name, total = device_bytes(cfg.estimate.gpu)
    return total - CUDA_CONTEXT_BYTES, name


def main(argv: list[str]) -> int:
    from launcher.errors import ConfigError
    from launcher.memory.estimate import estimate
    from launcher.memory.fixes import rank_fixes
    from launcher.memory.table import render

    # What `auto` settings chose (compile, micro-batch) is logged while composing: show it.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    sweep, argv = _take_sweep(argv)
    try:
        if sweep is not None:
            return _sweep(argv, *sweep, as_json)
        job, world_size = _compose(argv)
        cfg = job.cfg
        est = estimate(cfg, job.recipe_class, world_size, cfg.estimate.gpu)
        fixes = (
            [] if est.fits else rank_fixes(cfg, job.recipe_class, world_size, est, est.device_bytes, est.gpu)
        )
    except ConfigError as err:
        print(f"launcher: invalid config: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if as_json:
        out = est.to_json()
        out["fixes"] = [
            {"overrides": f.overrides, "device_needed": f.device_needed, "fits": f.fits} for f in fixes
        ]
        print(json.dumps(out, indent=1))
    else:
        print(render(est, fixes))
    return 0 if est.fits else EXIT_DOES_NOT_FIT


def _compose(argv: list[str]):
    """The job of these overrides, composed and checked for estimate.gpu, and its world size."""
    from launcher.config import cli
    from launcher.errors import ConfigError

    request = cli.parse_argv(argv)
    if request.multirun or request.hydra_only:
        raise ConfigError("--multirun", "", "estimates one config at a time", "drop -m / --cfg")
    cli.register_all(request.overrides)
    job = cli.compose_jobs(request, lambda c: c.estimate.world_size, cuda=True, size_for=estimate_device)[0]
    if job.cfg.estimate.world_size < 1:
        raise ConfigError("estimate.world_size", job.cfg.estimate.world_size, "must be >= 1")
    return job, job.cfg.estimate.world_size


def _take_sweep(argv: list[str]) -> tuple[tuple[str, list[str]] | None, list[str]]:
    """`--sweep key=v1,v2,...` (or `--sweep=key=...`) out of argv: (key, values), the rest."""
    from launcher.errors import ConfigError

    rest, sweep = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--sweep" or arg.startswith("--sweep="):
            spec = arg.split("=", 1)[1] if arg.startswith("--sweep=") else next(args, "")
            key, _, values = spec.partition("=")
            if not key or not values:
                raise ConfigError(
                    "--sweep", spec, "needs key=v1,v2,...", "e.g. --sweep train.micro_batch_size=1,2,4"
                )
            sweep = (key, [v for v in values.split(",") if v])
        else:
            rest.append(arg)
    return sweep, rest


def _sweep(argv: list[str], key: str, values: list[str], as_json: bool) -> int:
    """One estimate per value of `key` (each traced once; shared parts are cached): the curve."""
    from launcher.memory.estimate import GIB, estimate

    rows = []
    for value in values:
        job, world_size = _compose([*argv, f"{key}={value}"])
        est = estimate(job.cfg, job.recipe_class, world_size, job.cfg.estimate.gpu)
        worst = est.worst
        rows.append(
            {
                key: value,
                "peak_allocated": worst.peak_allocated,
                "peak_reserved": worst.peak_reserved,
                "device_needed": worst.device_needed,
                "device_bytes": est.device_bytes,
                "fits": est.fits,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"memory estimate by {key} on {est.gpu} ({est.device_bytes / GIB:.1f} GiB), fullest rank, GiB")
        print(f"{key:>28} {'allocated':>10} {'reserved':>10} {'needed':>10}  fits")
        for r in rows:
            print(
                f"{r[key]:>28} {r['peak_allocated'] / GIB:10.3f} {r['peak_reserved'] / GIB:10.3f} "
                f"{r['device_needed'] / GIB:10.3f}  {'yes' if r['fits'] else 'no'}"
            )
    return 0 if any(r["fits"] for r in rows) else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m launcher.estimate <the overrides of a run>`: predicted GPU memory per rank, no GPU needed.

    python -m launcher.estimate experiment=gpt2_small estimate.gpu=H100
    python -m launcher.estimate experiment=gpt2_small estimate.world_size=4 parallel=pipeline --json

Exit codes: 0 it fits; 2 invalid configuration; 5 it does not fit (fixes are printed).
"""

from __future__ import annotations

import json
import sys

EXIT_CONFIG, EXIT_DOES_NOT_FIT = 2, 5


def main(argv: list[str]) -> int:
    from launcher import cli
    from launcher.errors import ConfigError
    from launcher.memory.estimate import estimate
    from launcher.memory.fixes import rank_fixes
    from launcher.memory.table import render

    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    try:
        request = cli.parse_argv(argv)
        if request.multirun or request.hydra_only:
            raise ConfigError("--multirun", "", "estimates one config at a time", "drop -m / --cfg")
        cli.register_all(request.overrides)
        job = cli.compose_jobs(request, lambda c: c.estimate.world_size, cuda=True)[0]  # for a GPU
        cfg = job.cfg
        world_size = cfg.estimate.world_size
        if world_size < 1:
            raise ConfigError("estimate.world_size", world_size, "must be >= 1")
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

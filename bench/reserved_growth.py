"""When reserved memory grows, in the estimator's allocator replay and on the GPU: the requests that
made the allocator map more memory, for a case whose reserved estimate misses.

    python3 bench/reserved_growth.py conv_fp32_sgd_ac_mb64                      # the replay only (CPU)
    python3 bench/reserved_growth.py conv_fp32_sgd_ac_mb64 --snapshot s.pickle.gz   # and the GPU's

The snapshot is bench_memory's (`--snapshot CASE --snapshot-dir DIR`: the launcher's
memory.record_history over the case's steps). Each line: the request (MiB), allocated before it and
reserved after it (GiB). The replay is launcher/memory/caching_allocator.py over the traced events
(two steps, as `_reserved_extra` plays them); the GPU's are `segment_alloc` / `segment_map` events.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_memory import ALL_CASES  # noqa: E402
from launcher.config import cli  # noqa: E402
from launcher.memory import step_trace  # noqa: E402
from launcher.memory.estimate import estimate  # noqa: E402

MIB, GIB = 2**20, 2**30


def replay_growth(name: str, expandable: bool) -> list[tuple[float, float, float]]:
    """(request MiB, allocated GiB before, reserved GiB after) at each growth of the estimator's replay."""
    captured: list[list] = []

    def capture(events, exp):  # noqa: ANN001
        if exp == expandable:
            captured.append(list(events))
        return original(events, exp)

    original = step_trace.replay
    step_trace.replay = capture
    try:
        request = cli.parse_argv(list(ALL_CASES[name]))
        cli.register_all(request.overrides)
        job = cli.compose_jobs(request, 1, cuda=True)[0]
        estimate(job.cfg, job.recipe_class, 1, "H100")
    finally:
        step_trace.replay = original
    if not captured:
        sys.exit(f"{name}: the estimate replayed no allocations")
    growth: list[tuple[int, int, int]] = []
    original(captured[-1], expandable, growth)
    return [(size / MIB, allocated / GIB, reserved / GIB) for size, allocated, reserved in growth]


def gpu_growth(snapshot: Path) -> list[tuple[float, float, float]]:
    """The same from a CUDA allocator history: the request each segment_alloc / segment_map served."""
    opener = gzip.open if snapshot.suffix == ".gz" else open
    with opener(snapshot, "rb") as f:
        data = pickle.load(f)
    allocated = reserved = 0
    growth = []
    mapped = 0
    for event in data["device_traces"][0]:
        action, size = event["action"], event["size"]
        if action in ("segment_alloc", "segment_map"):
            reserved += size
            mapped += size
        elif action in ("segment_free", "segment_unmap"):
            reserved -= size
        elif action == "alloc":
            if mapped:
                growth.append((size / MIB, allocated / GIB, reserved / GIB))
                mapped = 0
            allocated += size
        elif action == "free_completed":
            allocated -= size
    return growth


def show(title: str, growth: list[tuple[float, float, float]]) -> None:
    print(f"\n## {title}: {len(growth)} growths")
    for request, allocated, reserved in growth:
        print(
            f"  request {request:9.2f} MiB  allocated before {allocated:7.3f}  reserved after {reserved:7.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("case", help="a case name from bench/bench_memory.py's suites")
    parser.add_argument("--snapshot", type=Path, help="the case's allocator history (.pickle or .pickle.gz)")
    parser.add_argument("--no-expandable", action="store_true", help="replay without expandable segments")
    args = parser.parse_args()
    show(f"{args.case}: estimator replay", replay_growth(args.case, not args.no_expandable))
    if args.snapshot:
        show(f"{args.case}: GPU ({args.snapshot.name})", gpu_growth(args.snapshot))


if __name__ == "__main__":
    main()

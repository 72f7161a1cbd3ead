"""The estimate as a table people read (GiB per part, one column per distinct rank) or as JSON."""

from __future__ import annotations

from launcher.memory.estimate import Estimate
from launcher.memory.fixes import Fix

GIB = 2**30


def render(est: Estimate, fixes: list[Fix] | None = None) -> str:
    ranks = est.ranks
    names: list[str] = []
    for rank in ranks:
        names += [k for k in rank.parts if k not in names]
    width = max(len(n) for n in [*names, "device needed (+ CUDA context, NCCL)"]) + 2
    col = max(12, *(len(r.ranks) + 2 for r in ranks))

    def row(label: str, values: list[str]) -> str:
        return label.ljust(width) + "".join(v.rjust(col) for v in values)

    lines = [f"memory estimate: {est.layout}, per rank, GiB", row("", [r.ranks for r in ranks])]
    for name in names:
        lines.append(row(name, [_gib(r.parts.get(name, 0)) for r in ranks]))
    rule = "-" * (width + col * len(ranks))
    lines += [
        rule,
        row("peak allocated (max_memory_allocated)", [_gib(r.peak_allocated) for r in ranks]),
        row("peak reserved (max_memory_reserved)", [_gib(r.peak_reserved) for r in ranks]),
        row("device needed (+ CUDA context, NCCL)", [_gib(r.device_needed) for r in ranks]),
        row(f"device: {est.gpu}", [_gib(est.device_bytes)] * len(ranks)),
    ]
    notes: list[str] = []
    for key in ranks[0].notes:
        notes.append(row(f"  {key}", [str(r.notes.get(key, "")) for r in ranks]))
    if notes:
        lines += ["", "notes (not parts of the peak):", *notes]
    worst = est.worst
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines += [
        "",
        f"{verdict}: the fullest rank ({worst.ranks}) needs {_gib(worst.device_needed)} GiB of "
        f"{_gib(est.device_bytes)} GiB ({100 * worst.device_needed / est.device_bytes:.0f}%)",
    ]
    if fixes:
        lines.append("fixes, largest saving first (add to the command line):")
        lines += [format_fix(f) for f in fixes]
    return "\n".join(lines)


def format_fix(fix: Fix) -> str:
    fits = "fits" if fix.fits else "still too big"
    return f"  {fix.command}    -> {_gib(fix.device_needed)} GiB, saves {_gib(fix.saving)} GiB ({fits})"


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"

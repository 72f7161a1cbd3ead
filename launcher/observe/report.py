"""Plots and a summary of one or more runs, from what they left in their run directories.

    python -m launcher.report RUN_DIR [RUN_DIR ...] [-o OUT]

Writes PNGs (loss and eval loss, throughput, where step time goes, memory, learning rate, gradient
norm, compression ratio when a comm hook compressed), several runs overlaid with a legend, and
`report.md`: final and best losses, median throughput and MFU, peak memory per rank, wall time,
restarts/requeues, skipped and non-finite steps. OUT defaults to `<RUN_DIR>/report` for one run and
`./report` for several. Reads `metrics.jsonl` (and `starts.jsonl`, `config.yaml`, `FINISHED`) only, so
it works on a run still in progress (a half-written last line is ignored) and on a requeued one.
Prints report.md, then the summaries as one JSON line (for scripts). Exit code 2 when a directory has
no metrics to report.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError

FIGSIZE, DPI = (8.0, 4.5), 100  # every PNG is 800 x 450 pixels
TIME_FIELDS = ("time_data_s", "time_forward_backward_s", "time_optimizer_s", "time_log_sync_s", "time_comm_s")


@dataclass
class Run:
    """What one run directory holds, each step once (the last line written for it wins)."""

    path: Path
    label: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    starts: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False

    @property
    def unit(self) -> str | None:
        for key in ("tokens_per_s", "samples_per_s"):
            if any(key in m for m in self.train):
                return key
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now (run in progress) or torn by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _label(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        try:
            name = (yaml.safe_load(config.read_text()) or {}).get("run", {}).get("name")
        except yaml.YAMLError:
            name = None
        if name:
            return str(name)
    return run_dir.name


def load_run(run_dir: Path) -> Run:
    """Read a run directory. Raises ConfigError (exit 2) when it has no train metrics."""
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", str(run_dir), "is not a directory", "pass a run directory (run.dir)")
    rows = _read_jsonl(metrics)
    by_step: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        if "step" not in row:
            continue
        kind = "train" if "loss" in row else "eval" if "eval_loss" in row else None
        if kind:
            by_step[(kind, int(row["step"]))] = row  # a rewritten step (resume) keeps its last line
    train = [by_step[k] for k in sorted(k for k in by_step if k[0] == "train")]
    evals = [by_step[k] for k in sorted(k for k in by_step if k[0] == "eval")]
    if not train:
        problem = "has no metrics.jsonl" if not metrics.is_file() else "has no train lines in metrics.jsonl"
        raise ConfigError(
            "RUN_DIR",
            str(run_dir),
            problem,
            "pass a run directory written by `python -m launcher` that has logged at least one step",
        )
    return Run(
        path=run_dir,
        label=_label(run_dir),
        train=train,
        eval=evals,
        starts=_read_jsonl(run_dir / "starts.jsonl"),
        finished=(run_dir / "FINISHED").is_file(),
    )


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(m[key]) for m in rows if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]


def peak_memory_per_rank(run: Run) -> dict[int, float]:
    """Largest torch-allocated GiB per rank: from `gpus` (every rank) or rank 0's own field."""
    peaks: dict[int, float] = {}
    for m in run.train:
        for gpu in m.get("gpus") or []:
            value = gpu.get("max_mem_allocated_gib")
            if value is not None:
                peaks[gpu["rank"]] = max(peaks.get(gpu["rank"], 0.0), value)
        if "max_mem_allocated_gib" in m and not m.get("gpus"):
            peaks[0] = max(peaks.get(0, 0.0), m["max_mem_allocated_gib"])
    return peaks


def wall_time_s(run: Run) -> float | None:
    """Seconds spent training, summed over every start (restarts and requeues); the gaps between them
    (queue time, a crashed job) do not count. Each start ends at its last logged line."""
    stamps = sorted(m["timestamp"] for m in run.train + run.eval if "timestamp" in m)
    if not stamps:
        return None
    starts = sorted(s["timestamp"] for s in run.starts) or [stamps[0]]
    total = 0.0
    for i, begin in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else math.inf
        inside = [t for t in stamps if begin <= t < end]
        if inside:
            total += inside[-1] - begin
    return total


def summarize(run: Run) -> dict[str, Any]:
    """The numbers of report.md for one run, straight from its metrics."""
    losses, evals = _values(run.train, "loss"), _values(run.eval, "eval_loss")
    unit = run.unit
    throughput = _values(run.train, unit) if unit else []
    mfu = _values(run.train, "mfu")
    last = run.train[-1]
    return {
        "run": run.label,
        "last_step": int(last["step"]),
        "finished": run.finished,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "throughput_unit": unit,
        "median_throughput": statistics.median(throughput) if throughput else None,
        "median_mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gib_per_rank": peak_memory_per_rank(run),
        "wall_time_s": wall_time_s(run),
        "restarts": max(len(run.starts) - 1, 0),
        "requeues": max((int(s.get("slurm_restart_count") or 0) for s in run.starts), default=0),
        "skipped_steps": int(last.get("skipped_steps", 0)),
        "nonfinite_steps": int(last.get("nonfinite_steps", 0)),
    }


# --- plots ------------------------------------------------------------------------------------


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [
        (m["step"], float(m[key]))
        for m in rows
        if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _per_rank(rows: list[dict[str, Any]], key: str) -> dict[int, tuple[list[int], list[float]]]:
    out: dict[int, tuple[list[int], list[float]]] = {}
    for m in rows:
        for gpu in m.get("gpus") or []:
            if gpu.get(key) is not None:
                steps, values = out.setdefault(gpu["rank"], ([], []))
                steps.append(m["step"])
                values.append(float(gpu[key]))
    return out


def _lines(run: Run, plot: str) -> list[tuple[str, list[int], list[float], dict[str, Any]]]:
    """(label suffix, steps, values, line style) for one run in one plot."""
    if plot == "loss":
        return [
            ("loss", *_series(run.train, "loss"), {}),
            ("eval_loss", *_series(run.eval, "eval_loss"), {"linestyle": "--", "marker": "o"}),
        ]
    if plot == "throughput":
        return [(run.unit or "", *_series(run.train, run.unit), {})] if run.unit else []
    if plot == "step_time":
        styles = ("--", ":", "-.", (0, (1, 3)), (0, (5, 1, 1, 1)))  # one per field, told apart in overlays
        return [("step_time_s", *_series(run.train, "step_time_s"), {"linewidth": 2})] + [
            (key, *_series(run.train, key), {"linestyle": style}) for key, style in zip(TIME_FIELDS, styles)
        ]
    if plot == "memory":
        ranks = _per_rank(run.train, "max_mem_allocated_gib")
        if ranks:
            lines = [(f"rank{r} allocated", *sv, {}) for r, sv in sorted(ranks.items())]
            used = _per_rank(run.train, "mem_used_gib")
            return lines + [
                (f"rank{r} used (NVML)", *sv, {"linestyle": ":"}) for r, sv in sorted(used.items())
            ]
        return [("max_mem_allocated_gib", *_series(run.train, "max_mem_allocated_gib"), {})]
    if plot == "compression_ratio":
        steps, values = _series(run.train, "compression_ratio")
        return [("compression_ratio", steps, values, {})] if any(v != 1.0 for v in values) else []
    return [(plot, *_series(run.train, plot), {})]


PLOTS = {
    "loss": ("Loss", "loss"),
    "throughput": ("Throughput", "per second"),
    "step_time": ("Where step time goes (log steps)", "seconds"),
    "memory": ("Peak memory", "GiB"),
    "lr": ("Learning rate", "lr"),
    "grad_norm": ("Gradient norm", "norm"),
    "compression_ratio": ("Gradient compression", "uncompressed / sent bytes"),
}


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """One PNG per plot that has data in some run; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (title, ylabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        drawn = 0
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for suffix, steps, values, style in _lines(run, name):
                if not steps:
                    continue
                label = f"{run.label}: {suffix}" if len(runs) > 1 else suffix
                ax.plot(steps, values, label=label, **{"color": color, **style} if len(runs) > 1 else style)
                drawn += 1
        if drawn:
            ax.set_title(title if len(runs) > 1 else f"{title}: {runs[0].label}")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path)
            written.append(path)
        plt.close(fig)
    return written


# --- summary ----------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no (in progress or stopped)"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"rank{k} {v:.3g}" for k, v in sorted(value.items())) or "-"
    return str(value)


def write_markdown(runs: list[Run], summaries: list[dict[str, Any]], plots: list[Path], out: Path) -> Path:
    rows = [
        ("run directory", [str(r.path) for r in runs]),
        *[(key, [s[key] for s in summaries]) for key in summaries[0] if key != "run"],
    ]
    lines = ["# Run report", "", "| | " + " | ".join(s["run"] for s in summaries) + " |"]
    lines.append("|---" * (len(runs) + 1) + "|")
    lines += [f"| {key} | " + " | ".join(_show(v) for v in values) + " |" for key, values in rows]
    lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(run_dirs: list[Path], out: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Write the report; returns report.md's path and the summaries. Raises ConfigError on bad input."""
    runs = [load_run(Path(d)) for d in run_dirs]
    out = out or (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(run) for run in runs]
    plots = write_plots(runs, out)
    return write_markdown(runs, summaries, plots, out), summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    try:
        path, summaries = report(args.run_dirs, args.out)
    except ConfigError as err:
        print(f"launcher.report: invalid input: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(json.dumps(summaries, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

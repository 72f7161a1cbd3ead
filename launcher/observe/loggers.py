"""Where metrics go besides metrics.jsonl: the console (rank 0) and, optionally, wandb or TensorBoard
(rank 0)."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

from launcher.config.schema import ConsoleLoggerConfig, TensorBoardLoggerConfig, WandbLoggerConfig

log = logging.getLogger("launcher")


class NullLogger:
    """What ranks other than 0 get: they log nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleLogger(NullLogger):
    """A progress bar on a terminal; a plain line per logged step otherwise (CI logs, Slurm files)."""

    def __init__(self, cfg: ConsoleLoggerConfig, start_step: int, total_steps: int) -> None:
        self.bar = None
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            _BarHandler.bar = self.bar

    def log(self, record: dict[str, Any]) -> None:
        if "eval_loss" in record:
            log.info("eval " + format_record(record))
        elif self.bar:
            # Short, so the bar keeps its width; every field is in metrics.jsonl and the log lines.
            short = {k: record[k] for k in ("loss", "tokens_per_s", "samples_per_s") if k in record}
            self.bar.set_postfix_str(format_record(short), refresh=False)
        else:
            log.info(format_record(record))

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            _BarHandler.bar = None


class WandbLogger(ConsoleLogger):
    """Console plus a wandb run whose id lives in the run directory, so a resumed job continues it."""

    def __init__(
        self,
        cfg: WandbLoggerConfig,
        start_step: int,
        total_steps: int,
        run_dir: Path,
        config: dict[str, Any],
        name: str | None = None,
    ) -> None:
        super().__init__(cfg, start_step, total_steps)
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            mode=cfg.mode.value,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            name=name or run_dir.name,
            config=config,
        )

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        self.run.log({k: v for k, v in scalars(record).items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        super().close()
        self.run.finish()  # idempotent in wandb


class TensorBoardLogger(ConsoleLogger):
    """Console plus TensorBoard event files in `<run dir>/tensorboard/`.

    A resumed run appends to the same directory with `purge_step`: TensorBoard then drops what an
    earlier attempt logged after the checkpoint it resumed from, so each step shows once.
    """

    def __init__(self, cfg: TensorBoardLoggerConfig, start_step: int, total_steps: int, run_dir: Path):
        super().__init__(cfg, start_step, total_steps)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"),
            purge_step=start_step + 1 if start_step else None,
            flush_secs=max(1, int(cfg.flush_s)),
        )

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        for key, value in scalars(record).items():
            if key != "step":  # tags as in metrics.jsonl: loss, eval_loss, lr, gpus/rank0/util_pct ...
                self.writer.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        super().close()
        self.writer.close()  # idempotent


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as flat scalars: per-rank lists (e.g. `gpus`) become `gpus/rank<r>/<key>`."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    rank = item.get("rank")
                    for k, v in item.items():
                        if k != "rank" and isinstance(v, (int, float)):
                            flat[f"{key}/rank{rank}/{k}"] = v
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def build_logger(
    cfg: Any,
    is_main: bool,
    start_step: int,
    total_steps: int,
    run_dir: Path,
    config: dict[str, Any],
    name: str | None = None,
) -> NullLogger:
    if not is_main:
        return NullLogger()
    if isinstance(cfg, WandbLoggerConfig):
        return WandbLogger(cfg, start_step, total_steps, run_dir, config, name)
    if isinstance(cfg, TensorBoardLoggerConfig):
        return TensorBoardLogger(cfg, start_step, total_steps, run_dir)
    return ConsoleLogger(cfg, start_step, total_steps)


# Shown in metrics.jsonl and wandb, but only noise on the console.
QUIET_KEYS = ("allreduce_bytes", "global_batch_size")


def format_record(record: dict[str, Any]) -> str:
    """One console line: integers and large values with thousands separators, small ones to 4
    significant digits; byte counters and a compression ratio of 1 (no hook) left out."""
    parts = []
    for key, value in record.items():
        if isinstance(value, (list, dict)) or key == "timestamp":
            continue  # per-rank detail (e.g. gpus): in metrics.jsonl, too long for a console line
        if key.startswith(QUIET_KEYS) or (key == "compression_ratio" and value == 1):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            shown = str(value)
        elif key == "lr":
            shown = f"{value:.3e}"
        elif isinstance(value, int) or abs(value) >= 1000:
            shown = f"{value:,.0f}"
        else:
            shown = f"{value:.4g}"
        parts.append(f"{key} {shown}")
    return " | ".join(parts)


class _BarHandler(logging.StreamHandler):
    """Log lines printed above a live progress bar (through tqdm.write), not into it."""

    bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is None:
            return super().emit(record)
        try:
            self.bar.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(rank: int, level: int | None = None) -> None:
    """Python logging with the rank in every line. Ranks other than 0 show errors only (and no Python
    warnings): the same warning from every rank is noise; rank 0 says it once."""
    handler = _BarHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    )
    logging.basicConfig(
        level=level if level is not None else (logging.INFO if rank == 0 else logging.ERROR),
        handlers=[handler],
        force=True,
    )
    if rank != 0:
        warnings.filterwarnings("ignore")

"""Where metrics go besides metrics.jsonl: the console (rank 0) and, optionally, wandb or TensorBoard
(rank 0)."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from launcher.config import ConsoleLoggerConfig, TensorBoardLoggerConfig, WandbLoggerConfig

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

    def log(self, record: dict[str, Any]) -> None:
        if "eval_loss" in record:
            line = "eval " + _format(record)
            self.bar.write(line) if self.bar else log.info(line)
        elif self.bar:
            self.bar.set_postfix_str(_format({k: v for k, v in record.items() if k != "step"}), refresh=False)
        else:
            log.info(_format(record))

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


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


def _format(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, (list, dict)) or key == "timestamp":
            continue  # per-rank detail (e.g. gpus): in metrics.jsonl, too long for a console line
        if isinstance(value, float):
            value = f"{value:.3e}" if key == "lr" else f"{value:,.1f}" if value >= 1000 else f"{value:.4g}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)


def configure_logging(rank: int, level: int | None = None) -> None:
    """Python logging with the rank in every line; ranks other than 0 show warnings and errors only."""
    logging.basicConfig(
        level=level if level is not None else (logging.INFO if rank == 0 else logging.WARNING),
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )

"""A GPT recipe that misbehaves on request, for the reliability tests (the launcher never imports it).

    recipe=tests.faults.faulty:FaultyGPT recipe.fault=raise:1:5 recipe.delay_s=0.1

`fault` = "<kind>:<rank>:<step>": on that rank, at the first loss computation of training step <step>
(as the loop's WHERE says: DDP's bucket-settling pass at a start counts as its first step's),
`sleep` (hang for 10 minutes), `raise` (an exception) or `nan` (a NaN loss). `delay_s` slows every step
so that tests can act mid-run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from launcher.train.loop import WHERE
from recipes.gpt import GPTConfig, GPTRecipe


class InjectedFault(Exception):
    pass


@dataclass
class FaultyGPTConfig(GPTConfig):
    fault: str = ""
    delay_s: float = 0.0


class FaultyGPT(GPTRecipe):
    Config = FaultyGPTConfig

    def __init__(self, cfg: FaultyGPTConfig) -> None:
        super().__init__(cfg)
        self.fired = False

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        time.sleep(self.cfg.delay_s)
        loss = super().loss(logits, targets)
        if not self.cfg.fault or self.fired:
            return loss
        kind, rank, at = self.cfg.fault.split(":")
        if os.environ.get("RANK", "0") != rank or WHERE != {"phase": "train step", "step": int(at)}:
            return loss
        self.fired = True
        if kind == "sleep":
            time.sleep(600)
        if kind == "raise":
            raise InjectedFault(f"injected fault on rank {rank} at step {at}")
        if kind == "nan":
            return loss * float("nan")
        return loss

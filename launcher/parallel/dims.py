"""Parallel degrees (pp x dp) checked against the world size, and the device mesh built from them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from launcher.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp: int

    @classmethod
    def resolve(cls, pp: int, dp: int, world_size: int) -> ParallelDims:
        """Degrees with dp=-1 filled in. Raises ConfigError naming every factor when they don't fit."""
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        if pp < 1 or world_size % pp:
            raise ConfigError(
                "parallel.pp",
                pp,
                f"does not divide world_size={world_size}",
                f"try parallel.pp={' or '.join(map(str, [d for d in divisors if d > 1] or [1]))}",
            )
        if dp == -1:
            dp = world_size // pp
        if dp < 1 or dp * pp != world_size:
            raise ConfigError(
                "parallel.dp",
                dp,
                f"dp * pp = {dp} * {pp} != world_size={world_size}",
                f"set parallel.dp={world_size // pp} or -1 (automatic)",
            )
        return cls(pp=pp, dp=dp)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        # pp outermost: the ranks of one data-parallel group are adjacent (same node where possible).
        return init_device_mesh(device_type, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))

"""This process's place among others, read in one place: torchrun's variables (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) and the cores it may use (its CPU affinity, which a
Slurm job or taskset narrows, split between the processes of one machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: one process without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1  # processes of this run on this machine (node)

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def cores_for_this_process(share: int = 1) -> int:
    """The cores this process may run on, split evenly between the processes of its run on this
    machine and then `share` ways (a sweep running several runs side by side), at least 1."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // (Ranks.from_env().local_world * share))

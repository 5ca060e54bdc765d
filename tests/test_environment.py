"""environment.py: torchrun's variables and the cores each process may use."""

from __future__ import annotations

import os

from dptrain.common.environment import Ranks, cores_for_this_process, under_torchrun


def test_ranks_come_from_torchruns_variables(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert Ranks.from_env() == Ranks(0, 0, 1, 1) and Ranks.from_env().is_main
    assert not under_torchrun()
    for name, value in {"RANK": 3, "LOCAL_RANK": 1, "WORLD_SIZE": 4, "LOCAL_WORLD_SIZE": 2}.items():
        monkeypatch.setenv(name, str(value))
    assert Ranks.from_env() == Ranks(3, 1, 4, 2) and not Ranks.from_env().is_main
    assert under_torchrun()


def test_cores_follow_affinity_and_are_split_between_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_for_this_process() == 16
    assert cores_for_this_process(share=2) == 8  # a sweep: two runs side by side
    assert cores_for_this_process(share=4) == 4  # two 2-GPU DDP runs: four processes
    assert cores_for_this_process(share=32) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # a 2-process run on this node
    assert cores_for_this_process() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})  # a Slurm job of one core
    assert cores_for_this_process() == 1

"""A sweep's grid: the (K, n, N) triples of the budgets and splits asked for, and the points
(K, n, seed) the shard set can hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.errors import DataError
from ..data.index import ShardIndex
from ..data.subset import select


@dataclass(frozen=True)
class Point:
    classes: int
    per_class: int
    seed: int
    size: int  # the budget N it belongs to (K n can differ from N by the rounding of n)

    @property
    def name(self) -> str:
        return f"K{self.classes}-n{self.per_class}-s{self.seed}"


def grid(*, sizes: list[int] = (), classes: list[int] = (), ratios: list[float] = (),
         points: list[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
    """(K, n, N) triples: each size N with each K (n = N / K, rounded) or each ratio
    r = K / n (K = sqrt(r N)), plus explicit points (N = K n); in order, without repeats."""
    if (classes or ratios) and not sizes:
        raise DataError("--classes and --ratios need --sizes")
    if sizes and not (classes or ratios):
        raise DataError("--sizes needs --classes or --ratios")
    if not (sizes or points):
        raise DataError("no grid: give --sizes with --classes or --ratios, or --points K:n,...")
    out = []
    for size in sizes:
        for k in classes:
            out.append((k, max(1, round(size / k)), size))
        for r in ratios:
            k = max(1, round(math.sqrt(r * size)))
            out.append((k, max(1, round(size / k)), size))
    out += [(k, n, k * n) for k, n in points]
    return list(dict.fromkeys(out))


def feasible(index: ShardIndex, triples: list[tuple[int, int, int]], seeds: list[int],
             allow_fewer: bool = False,
             subset_seed: int | None = None) -> tuple[list[Point], list[str]]:
    """The points the shard set can hold (their subsets drawn with `subset_seed`, else each
    point's seed), and a reason for each one it cannot."""
    ok, skipped = [], []
    for k, n, size in triples:
        for seed in seeds:
            try:
                select(index, k, n, seed=seed if subset_seed is None else subset_seed,
                       allow_fewer=allow_fewer)
            except DataError as e:
                skipped.append(f"K={k} n={n} seed={seed}: {e}")
                continue
            ok.append(Point(k, n, seed, size))
    return ok, skipped

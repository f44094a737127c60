"""Ratios of paired timings, and how sure they are: shared by the benchmarks and decode_table.py (no torch import).

Why: the machines are shared and noisy, so a ratio is taken between timings made close together (a round, or a
decode step, of each variant in turn) and reported with the spread that resampling whole rounds gives.
"""

from __future__ import annotations

import itertools
import random
import statistics


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-pair ratios (per round, or per step): robust to the machine slowing down between pairs."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def ratio_interval(result: dict, num: str, den: str, resamples: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of the paired ratio, resampling whole rounds (`steps_per_round` pairs each, one if
    absent): the pairs of one round share its conditions."""
    times = result["seconds_per_token"]
    lengths = result.get("steps_per_round") or [1] * len(times[num])
    starts = [0, *itertools.accumulate(lengths)]
    rounds = [
        [a / b for a, b in zip(times[num][i:j], times[den][i:j], strict=True)] for i, j in itertools.pairwise(starts)
    ]
    rng = random.Random(0)
    medians = sorted(
        statistics.median([r for picked in rng.choices(rounds, k=len(rounds)) for r in picked])
        for _ in range(resamples)
    )
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]

"""The interval of a paired difference that says what it is: none for one pair, Student's t below
:data:`BOOTSTRAP_MIN_N` pairs, the percentile bootstrap (seeded, so a report is reproducible) from
there on (:func:`paired_interval`; docs/sweeps.md says why).
"""

from __future__ import annotations

import math
import random
import statistics

#: the level of every paired interval
LEVEL = 0.95


#: from this many paired seeds on an interval is the percentile bootstrap's, below it Student's t
#: (docs/sweeps.md: below 30 pairs the bootstrap's 95% interval covers the true mean difference
#: 75% of the time at 3 pairs, 90% at 10, 93% at 20; t's stays at 95% for normal differences)
BOOTSTRAP_MIN_N = 30


#: below this many paired seeds the report warns that an interval is wide and unreliable
FEW_SEEDS = 5


#: how the report names each kind of interval
INTERVAL_NAMES = {"t": "t 95%", "bootstrap": "bootstrap 95%"}


def t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (integer) degrees of freedom, exactly: the finite
    series of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df) in theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):  # (2 4 ... 2k) / (3 5 ... 2k+1) cos^(2k+1)
            term *= cos2 * 2 * k / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(1, df // 2):  # (1 3 ... 2k-1) / (2 4 ... 2k) cos^(2k)
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: the t whose central
    mass is 2p - 1 (:func:`t_central_mass`), found by bisection on theta to the float's precision
    (the project does not depend on scipy; tests compare with its values and with the tables)."""
    low, high = 0.0, math.pi / 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_central_mass(math.sqrt(df) * math.tan(mid), df) < 2 * p - 1:
            low = mid
        else:
            high = mid
        if high - low < 1e-15:
            break
    return math.sqrt(df) * math.tan((low + high) / 2)


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """Student's t 95% interval of the mean of ``diffs`` (two or more): mean -+ t_{0.975, n-1} sd / sqrt(n)."""
    n = len(diffs)
    mean, half = statistics.fmean(diffs), t_quantile(0.5 + LEVEL / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(diffs: list[float], seed: int = 0, resamples: int = 10_000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``diffs`` (deterministic given ``seed``)."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, math.ceil(0.975 * resamples) - 1)]


def paired_interval(diffs: list[float], seed: int = 0) -> tuple[str | None, list[float] | None]:
    """The 95% interval of the mean paired difference and its kind: none for one pair (no spread
    to measure), Student's t below :data:`BOOTSTRAP_MIN_N` pairs (a bootstrap from a few values
    only reshuffles them: from 2 it is their min and max, from 3 it has 10 distinct resamples, and it
    covers far less than 95%), the percentile bootstrap from there on (no normality assumed)."""
    if len(diffs) < 2:
        return None, None
    if len(diffs) < BOOTSTRAP_MIN_N:
        return "t", list(t_interval(diffs))
    return "bootstrap", list(bootstrap_interval(diffs, seed))

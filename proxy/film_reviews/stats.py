"""Means with standard errors, and paired differences, for the quality benchmark (no numpy).

The benchmark's unit of observation is one (opening, seed). Seeds of the same opening share
the opening, so they are not independent draws: standard errors here are clustered by opening
(average each opening's seeds first, then the spread across openings), which is the honest
error bar when the openings are what we sample from a population of reviews. With one seed
per opening this is the plain standard error of the mean.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Estimate:
    """A mean over clusters, its standard error, the number of clusters and of observations."""

    mean: float
    se: float
    clusters: int
    n: int

    @property
    def z(self) -> float:
        """mean / se: how many standard errors from zero (inf for an exact nonzero, nan for 0/0)."""
        if self.se > 0:
            return self.mean / self.se
        return math.nan if self.mean == 0 or math.isnan(self.mean) else math.copysign(math.inf, self.mean)

    def fmt(self, digits: int = 3, signed: bool = True) -> str:
        sign = "+" if signed else ""
        if math.isnan(self.mean):
            return "n/a"
        return f"{self.mean:{sign}.{digits}f} ± {self.se:.{digits}f}"


def mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


def standard_error(xs: list[float]) -> float:
    """Sample standard deviation (n - 1) over sqrt(n); nan below two values."""
    n = len(xs)
    if n < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1) / n)


def first(key: Hashable) -> Hashable:
    """The default cluster of a key: its first element (the opening of (opening, seed))."""
    return key[0] if isinstance(key, tuple) else key


def estimate(values: Mapping[K, float], cluster: Callable[[K], Hashable] = first) -> Estimate:
    """Mean and clustered standard error of `values` (key -> observation).

    Each cluster's observations are averaged into one number; the estimate is the mean of those
    numbers and its standard error their standard deviation over sqrt(number of clusters).
    """
    groups: dict[Hashable, list[float]] = {}
    for key, v in values.items():
        groups.setdefault(cluster(key), []).append(float(v))
    per_cluster = [mean(g) for g in groups.values()]
    return Estimate(mean(per_cluster), standard_error(per_cluster), len(per_cluster), len(values))


def paired(a: Mapping[K, float], b: Mapping[K, float], cluster: Callable[[K], Hashable] = first) -> Estimate:
    """a - b on the keys both have, e.g. a method's judge score minus base's on the same (opening, seed)."""
    return estimate({k: a[k] - b[k] for k in a.keys() & b.keys()}, cluster)

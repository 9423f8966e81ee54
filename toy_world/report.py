"""The demo report's arithmetic: paired differences with their 95% intervals, the verdict they give,
and the tables the report leads with. Pure functions of per-input numbers, so each is tested by hand."""
import numpy as np

Z95 = 1.959964  # two-sided 95% normal quantile


def paired_difference(start, end):
    """(mean of end - start, low, high): a normal 95% interval of the mean paired difference over inputs
    (same inputs and seeds on both sides); the interval is (nan, nan) with fewer than two inputs."""
    d = np.asarray(end, dtype=np.float64) - np.asarray(start, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_difference: start and end must be equal-length, non-empty lists of per-input numbers")
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = Z95 * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(low, high, lower_is_better):
    """'better' / 'worse' when the interval excludes zero on that side, else 'no clear change'."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no interval"
    if high < 0:
        return "better" if lower_is_better else "worse"
    if low > 0:
        return "worse" if lower_is_better else "better"
    return "no clear change"


def method_row(method, signal, measure, start, end, lower_is_better, digits=4):
    """One row of the lead table from per-input numbers: start and end means, the paired difference and
    its interval, and the verdict in the measure's own direction."""
    diff, low, high = paired_difference(start, end)
    f = f"{{:.{digits}f}}"
    return {"method": method, "signal": signal, "measure": measure, "start": float(np.mean(start)), "end": float(np.mean(end)),
            "difference": diff, "low": low, "high": high, "inputs": len(start),
            "verdict": verdict(low, high, lower_is_better),
            "cells": [method, signal, measure, f.format(np.mean(start)), f.format(np.mean(end)),
                      f"{diff:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]", verdict(low, high, lower_is_better)]}


def markdown_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def lead_table(rows):
    return markdown_table(["method", "signal", "held-out measure", "start", "end", "paired difference [95% CI]", "verdict"],
                          [r["cells"] for r in rows])


def hacking_reading(score_row, error_row):
    """What a method's two changes say together: the discriminator's score rising while the GT error
    does not fall is the signature of reward hacking."""
    score, error = score_row["verdict"], error_row["verdict"]
    if score == "better":
        return {"worse": "reward hacking: the score rose while the GT error grew",
                "better": "both improved: no sign of hacking"}.get(error, "score up, GT error not better: the gain does not reach the GT metric")
    if score == "worse":
        return "the score fell" + (" and the GT error grew" if error == "worse" else " while the GT error fell" if error == "better"
                                   else ", the GT error unchanged")
    return {"worse": "GT error grew without a clear score gain", "better": "GT error fell, the score unchanged"}.get(
        error, "no clear change in either")


def hypervolume_change(start, front, reference, draws=2000, seed=0):
    """(hv(front) - hv(start), low, high) on test inputs: the hypervolume of the front's mean objective
    vectors minus that of the start's, with a 95% percentile bootstrap interval that resamples the
    inputs (the same resample for the start and every policy: paired). start: (inputs, objectives);
    front: a list of such arrays, one per policy (maximisation, as PGMORL's)."""
    from myutils.morl_utils import hypervolume

    start = np.asarray(start, dtype=np.float64)
    front = [np.asarray(f, dtype=np.float64) for f in front]
    if any(f.shape != start.shape for f in front) or start.ndim != 2:
        raise ValueError("hypervolume_change: the start and every policy need one objective vector per test input")

    def change(idx):
        return hypervolume([f[idx].mean(0) for f in front], reference) - hypervolume([start[idx].mean(0)], reference)

    rng = np.random.default_rng(seed)
    n = len(start)
    boots = np.array([change(rng.integers(0, n, n)) for _ in range(draws)])
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(change(np.arange(n))), float(low), float(high)

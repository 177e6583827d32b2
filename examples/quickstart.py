"""Quickstart: a Monte Carlo parameter sweep with one bad parameter set.

We price a European call option by simulating the stock price at expiry,
for several volatilities, with several independent seeds each, and check
every Monte Carlo estimate against the exact Black-Scholes price. The graph:

    validate(point) ──> simulate(point, seed) x 4 ──> estimate(point, partials)

One sweep point has a typo (a negative volatility). Its ``validate`` node
fails, so its four ``simulate`` nodes and its ``estimate`` are Skipped, while
every other point completes. ``compute`` then raises ``gx.GraphFailed`` (an
overnight run must never report success with a failure in it); the
exception carries the complete run, so the good results are all there.

Run it::

    python examples/quickstart.py
"""

from __future__ import annotations

import math

import numpy as np

import graphexec as gx

SPOT = 100.0  # stock price today
STRIKE = 105.0
RATE = 0.03  # risk-free interest rate, per year
YEARS = 1.0  # time to expiry

SWEEP = [
    {"name": "calm", "sigma": 0.10},
    {"name": "normal", "sigma": 0.20},
    {"name": "volatile", "sigma": 0.35},
    {"name": "wild", "sigma": 0.60},
    {"name": "typo", "sigma": -0.25},  # the deliberate mistake
]
SEEDS_PER_POINT = 4
PATHS_PER_SEED = 1_000_000


@gx.task
def validate(point: dict) -> dict:
    """Refuse a meaningless volatility before any simulation time is spent on it.

    numpy would happily simulate with sigma < 0 (the result is the price for
    |sigma|), so without this check the typo would go unnoticed.
    """
    if not point["sigma"] > 0:
        raise ValueError(
            f"sweep point {point['name']!r}: volatility must be > 0, got sigma={point['sigma']}"
        )
    return point


# A simulation never raises by itself; what can go wrong is the machine (a worker
# killed, a node running far too long). Retry those, but not a ValueError: a bad
# parameter is just as bad on the second attempt.
@gx.task(retries=2, retry_delay=0.5, retry_on=(gx.WorkerCrashed, gx.TaskTimeout), timeout=120)
def simulate(point: dict, seed: int, paths: int) -> tuple[float, float, int]:
    """Discounted call payoffs of ``paths`` simulated prices: (sum, sum of squares, n)."""
    sigma = point["sigma"]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(paths)
    # Geometric Brownian motion, sampled exactly at expiry.
    final = SPOT * np.exp((RATE - 0.5 * sigma**2) * YEARS + sigma * math.sqrt(YEARS) * z)
    payoff = np.maximum(final - STRIKE, 0.0) * math.exp(-RATE * YEARS)
    return float(payoff.sum()), float(np.square(payoff).sum()), paths


@gx.task
def estimate(point: dict, partials: list[tuple[float, float, int]]) -> dict:
    """Reduce the per-seed partial sums to a price, its standard error and the exact price."""
    total = sum(p[0] for p in partials)
    squares = sum(p[1] for p in partials)
    n = sum(p[2] for p in partials)
    mean = total / n
    stderr = math.sqrt((squares / n - mean**2) / (n - 1))
    exact = black_scholes_call(point["sigma"])
    return {
        "name": point["name"],
        "sigma": point["sigma"],
        "price": mean,
        "stderr": stderr,
        "exact": exact,
        "z": (mean - exact) / stderr,
        "paths": n,
    }


def black_scholes_call(sigma: float) -> float:
    """The exact price of the same option (Black-Scholes formula)."""

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    d1 = (math.log(SPOT / STRIKE) + (RATE + 0.5 * sigma**2) * YEARS) / (sigma * math.sqrt(YEARS))
    d2 = d1 - sigma * math.sqrt(YEARS)
    return SPOT * cdf(d1) - STRIKE * math.exp(-RATE * YEARS) * cdf(d2)


def build() -> tuple[gx.Graph, dict[str, gx.Node]]:
    graph = gx.Graph("option-sweep")
    estimates = {}
    with graph:  # calls are captured as nodes here, nothing runs yet
        for i, point in enumerate(SWEEP):
            checked = validate(point)
            seeds = [1000 * i + k for k in range(SEEDS_PER_POINT)]  # independent streams
            partials = [simulate(checked, seed, PATHS_PER_SEED) for seed in seeds]
            estimates[point["name"]] = estimate(checked, partials)
    return graph, estimates


def main() -> None:
    graph, estimates = build()
    try:
        run = graph.compute()  # one worker process per core
    except gx.GraphFailed as failure:
        print(f"graphexec raised GraphFailed:\n{failure}\n")
        run = failure.run  # the complete run: nothing computed is lost

    print(f"European call, S={SPOT}, K={STRIKE}, r={RATE}, T={YEARS} years")
    print(f"{'point':<9} {'sigma':>6} {'Monte Carlo':>18} {'Black-Scholes':>14} {'z':>6}")
    for name, node in estimates.items():
        state = run.state(node)
        if state.is_completed():
            e = run[node]
            print(
                f"{name:<9} {e['sigma']:>6.2f} {e['price']:>10.4f} ± {e['stderr']:.4f} "
                f"{e['exact']:>14.4f} {e['z']:>6.2f}"
            )
        else:
            print(f"{name:<9} {state.name}: {state.message}")

    print()
    print(run.summary())


if __name__ == "__main__":  # good practice; graphexec's workers never import this script
    main()

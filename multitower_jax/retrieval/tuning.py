"""Tuning a ScaNN index for a target recall: the fewest leaves and the smallest re-ranking budget
that reach recall@K >= R against exact search, on held-out queries, then the fastest of those.

`frontier` searches, for each re-ranking budget, the smallest leaves_to_search whose recall on
the tuning queries clears the target by `margin_se` standard errors of the per-query mean (so
that other queries of the same kind clear it too). `time_rounds` times settings in interleaved
rounds (every setting once per round, the order rotated), so a load spike hits one round of
every setting instead of all rounds of one; ratios are taken per round, then the median.
Both `multitower index --target-recall` and `bench retrieve` use these.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from multitower_jax.retrieval.evaluate import overlap_counts
from multitower_jax.retrieval.exact import ExactSearch
from multitower_jax.retrieval.settings import RetrievalSettings

REORDERS = (100, 200, 500, 1000, 2000)  # re-ranking budgets tried (those below K are skipped)
LEAF_FRACTIONS = tuple(min(1.0, 0.003 * 1.2 ** i) for i in range(33))  # 0.3 % .. 100 %, steps of 20 %


@dataclasses.dataclass
class Setting:
    """One ScaNN search setting at K, with what it measured on the tuning queries."""

    leaves_to_search: int
    reorder: int
    recall: float = float("nan")  # mean recall@K on the tuning queries
    recall_se: float = float("nan")  # its standard error
    qps: float = float("nan")  # median batched QPS over the timing rounds

    def settings(self, base: RetrievalSettings, k: int) -> RetrievalSettings:
        """`base` with this setting as its search defaults at K (`reorder(k)` = reorder,
        `search_leaves(.., k, ..)` = leaves_to_search; other K scale the re-ranking budget)."""
        return dataclasses.replace(base, leaves_to_search=self.leaves_to_search, min_reorder=self.reorder,
                                   reorder_multiplier=max(1, self.reorder // max(k, 1)))


def recall_per_query(approx_BxK: np.ndarray, exact_BxK: np.ndarray) -> np.ndarray:
    """float[B]: |approx ∩ exact| / (exact results of that query), -1 padding ignored."""
    found = np.maximum((np.asarray(exact_BxK) >= 0).sum(1), 1)
    return overlap_counts(approx_BxK, exact_BxK) / found


def leaf_grid(num_leaves: int) -> list[int]:
    return sorted({max(1, min(num_leaves, math.ceil(f * num_leaves))) for f in LEAF_FRACTIONS})


def frontier(search: Callable[[int, int], np.ndarray], exact_BxK: np.ndarray, num_leaves: int, k: int,
             target: float, reorders: Sequence[int] = REORDERS, margin_se: float = 2.0,
             log: Callable[[str], None] | None = None, floor: Callable[[int], int] | None = None
             ) -> tuple[list[Setting], list[Setting]]:
    """(frontier, tried). `search(leaves, reorder)` returns rows int[B, K] for the tuning queries.
    For each budget in `reorders` (>= K) the smallest leaf count of `leaf_grid` whose recall
    minus `margin_se` standard errors is >= target, found by bisection (recall grows with the
    leaves searched). A budget that misses even at all leaves gives no frontier point. `floor(reorder)`,
    when given, is the fewest leaves a budget is searched with (the index's own floor: enough
    leaves to hold the candidates it re-ranks), so the grid of that budget starts there."""
    tried, out = [], []
    budgets = sorted({max(k, r) for r in reorders})

    def measure(leaves: int, reorder: int) -> Setting:
        r = recall_per_query(search(leaves, reorder), exact_BxK)
        s = Setting(leaves, reorder, float(r.mean()), float(r.std(ddof=1) / math.sqrt(len(r))) if len(r) > 1 else 0.0)
        tried.append(s)
        if log:
            log(f"  leaves_to_search={leaves:5d} reorder={reorder:5d}  recall@{k}={s.recall:.4f} ± {s.recall_se:.4f}")
        return s

    ok = lambda s: s.recall - margin_se * s.recall_se >= target
    for reorder in budgets:
        grid = leaf_grid(num_leaves)
        if floor is not None:
            grid = sorted({min(num_leaves, max(g, floor(reorder))) for g in grid})
        best = measure(grid[-1], reorder)  # the most leaves first: a budget that misses there is skipped
        if not ok(best):
            continue
        lo, hi = 0, len(grid) - 2
        while lo <= hi:
            mid = (lo + hi) // 2
            s = measure(grid[mid], reorder)
            if ok(s):
                best, hi = s, mid - 1
            else:
                lo = mid + 1
        out.append(best)
    return out, tried


def time_rounds(methods: dict[str, Callable[[], int]], rounds: int, log: Callable[[str], None] | None = None
                ) -> dict[str, list[float]]:
    """Per-round throughput of each method: `fn()` runs once and returns how many queries it
    answered; every method runs once per round, in an order rotated from round to round."""
    names = list(methods)
    out = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            count = methods[name]()
            out[name].append(count / (time.perf_counter() - t0))
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {out[n][-1]:,.0f}" for n in names))
    return out


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return float(np.median(np.asarray(num) / np.asarray(den)))


def split_queries(q_QxD: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tune, held_out): a seeded random half each (the tune half gets the odd one)."""
    perm = np.random.default_rng(seed).permutation(len(q_QxD))
    half = (len(q_QxD) + 1) // 2
    return q_QxD[perm[:half]], q_QxD[perm[half:]]


def tune_index(index, q_QxD: np.ndarray, k: int, target: float, rounds: int = 3, source: str = "",
               log: Callable[[str], None] | None = print) -> dict:
    """Tune `index` (an AdIndex) in place for recall@k >= target: the frontier on a random half of
    `q_QxD`, each frontier setting timed (batched, interleaved rounds) on that half, the fastest
    kept; its recall is then measured on the other half through the index's default search path
    (so `search` and `retrieve-eval` see exactly it). Sets `index.settings` and records
    `manifest["settings"]` and `manifest["tuning"]`, which this returns."""
    if not 0 < target <= 1:
        raise ValueError(f"--target-recall: expected a recall in (0, 1], got {target}")
    q_QxD = np.ascontiguousarray(q_QxD, np.float32)
    n, kk = len(index), min(k, len(index))
    record = {"target_recall": target, "k": kk, "num_queries": len(q_QxD), "queries": source}
    if index.searcher is None:  # exact mode: nothing to tune
        record.update(mode="exact", recall_at_k_tuning=1.0, recall_at_k_held_out=1.0, target_met=True)
        index.manifest["tuning"] = record
        return record
    if len(q_QxD) < 4:
        raise ValueError(f"--target-recall: need at least 4 tuning queries, got {len(q_QxD)}")
    tune_q, held_q = split_queries(q_QxD)
    exact = ExactSearch(index._search_vectors(np.arange(n)))
    exact_tune, exact_held = exact.search(tune_q, kk)[0], exact.search(held_q, kk)[0]
    num_leaves, base = index.manifest["num_leaves"], index.settings

    def effective(leaves: int, reorder: int) -> tuple[int, int]:
        s = Setting(leaves, reorder).settings(base, kk)
        return s.search_leaves(num_leaves, kk, n), s.reorder(kk)

    def search(q, leaves, reorder):
        eff_leaves, eff_reorder = effective(leaves, reorder)
        return index.search(q, kk, leaves_to_search=eff_leaves, reorder=eff_reorder)[0]

    if log:
        log(f"tuning leaves_to_search and reorder for recall@{kk} >= {target} on {len(tune_q)} queries "
            f"({source or 'given'}), {num_leaves} leaves")
    points, tried = frontier(lambda leaves, reorder: search(tune_q, leaves, reorder), exact_tune, num_leaves, kk,
                             target, log=log, floor=lambda reorder: effective(1, reorder)[0])
    target_met = bool(points)
    if not points:  # unreachable: the most accurate setting tried
        points = [max(tried, key=lambda s: s.recall)]
        if log:
            log(f"  no setting reaches recall@{kk} >= {target} on the tuning queries; keeping the most accurate")
    qps = time_rounds({f"{p.leaves_to_search}/{p.reorder}": (lambda p=p: len(search(tune_q, p.leaves_to_search,
                                                                                     p.reorder)))
                       for p in points}, rounds, log=log)
    for p in points:
        p.qps = float(np.median(qps[f"{p.leaves_to_search}/{p.reorder}"]))
    best = max(points, key=lambda p: p.qps)
    index.settings = best.settings(base, kk)
    held = recall_per_query(index.search(held_q, kk)[0], exact_held)
    eff_leaves, eff_reorder = effective(best.leaves_to_search, best.reorder)
    record.update(
        mode="scann", leaves_to_search=eff_leaves, reorder=eff_reorder, num_leaves=num_leaves,
        recall_at_k_tuning=round(best.recall, 4), recall_at_k_tuning_se=round(best.recall_se, 4),
        recall_at_k_held_out=round(float(held.mean()), 4), num_tuning_queries=len(tune_q),
        num_held_out_queries=len(held_q), qps_batched=round(best.qps, 1), timing_rounds=rounds,
        target_met=target_met and bool(held.mean() >= target),
        frontier=[dataclasses.asdict(p) for p in points])
    index.manifest["settings"] = dataclasses.asdict(index.settings)
    index.manifest["tuning"] = record
    if log:
        log(f"chosen: leaves_to_search={eff_leaves} reorder={eff_reorder}: recall@{kk} {best.recall:.4f} (tuning), "
            f"{held.mean():.4f} (held out), {best.qps:,.0f} QPS batched")
    return record

"""Pack a pool of samples into batches under a cost cap and a size cap.

This is the planning kernel of :class:`~adaptive_loader.BudgetBatchSampler`. It
is best-fit-decreasing done in vectorised rounds: the largest items anchor the
batches, then every round hands each open batch at most one more item, the
largest free item going to the tightest batch it fits. Items that fit nowhere
are left over; the sampler carries them into the next pool, where they meet
fresh partners. Everything is numpy, so a pool of a few thousand items costs a
few hundred microseconds, not a Python loop per item.

:func:`pack_padded` is the kernel for padded collates, where a batch costs
``len(batch) * max(cost)``: it sorts the pool by cost and cuts it into runs,
each as long as its largest item allows (buckets by cost).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["pack_pool", "pack_padded", "padded_capacity"]


def pack_pool(costs: np.ndarray, max_cost: float, max_batch_size: int) -> np.ndarray:
    """Assign each item of ``costs`` to a batch, or leave it over.

    Args:
        costs: 1-D float array, every entry in ``[0, max_cost]`` (oversized items
            are the caller's business: they go alone).
        max_cost: cost cap of one batch (``math.inf`` for none).
        max_batch_size: size cap of one batch.

    Returns:
        An int64 array ``batch_of`` with ``batch_of[i]`` the batch number of
        item ``i`` (batches are numbered ``0..k-1``) or ``-1`` if left over.
        Every batch is non-empty and within both caps; at least one item is
        placed whenever ``costs`` is non-empty.
    """
    n = len(costs)
    batch_of = np.full(n, -1, np.int64)
    if n == 0:
        return batch_of
    order = np.argsort(-costs, kind="stable")  # largest first
    x = costs[order]
    n_batches = _batch_count(x, max_cost, max_batch_size)
    assigned = np.full(n, -1, np.int64)
    assigned[:n_batches] = np.arange(n_batches)  # the largest items anchor the batches
    load = x[:n_batches].copy()
    count = np.ones(n_batches, np.int64)
    free = np.arange(n_batches, n)
    open_batches = np.arange(n_batches)
    room = max_cost - load  # anchors are largest first, so room is ascending already
    while len(free):
        if len(open_batches) == 0:
            break
        free_cost = x[free]
        # Tightest batch each free item fits in; items are largest first, so
        # targets are non-increasing and items sharing one are contiguous.
        target = np.searchsorted(room, free_cost, side="left")
        fits = np.flatnonzero(target < len(room))
        if len(fits) == 0:
            break
        target = target[fits]
        claim = target + _rank_within_runs(target)  # spread a run over the next batches
        claim[claim >= len(room)] = -1
        winners = _first_claimant(claim, len(room))  # one item per batch per round, largest first
        won = fits[winners]
        batches = open_batches[claim[winners]]
        assigned[free[won]] = batches
        load[batches] += free_cost[won]
        count[batches] += 1
        keep = np.ones(len(free), bool)
        keep[won] = False
        free = free[keep]
        open_batches = np.flatnonzero(count < max_batch_size)
        room = max_cost - load[open_batches]
        by_room = np.argsort(room, kind="stable")
        open_batches, room = open_batches[by_room], room[by_room]
    batch_of[order] = assigned
    return batch_of


def pack_padded(costs: np.ndarray, max_cost: float, max_batch_size: int, leave_partial: bool = True) -> np.ndarray:
    """Assign items to batches whose cost is ``len(batch) * max(cost)``.

    Largest first, each batch takes the next ``padded_capacity`` items of its
    first (largest) item. For one pool this needs the fewest batches possible:
    in any packing, the batch of the largest item holds at most that many
    items, and swapping in the next largest ones never makes another batch
    worse. With ``leave_partial``, a final batch that is not full is left over
    (``-1``) when it is not the only one, so it can meet the next pool.

    Same arguments and result as :func:`pack_pool`.
    """
    n = len(costs)
    batch_of = np.full(n, -1, np.int64)
    if n == 0:
        return batch_of
    order = np.argsort(-costs, kind="stable")
    cap = padded_capacity(costs[order], max_cost, max_batch_size)  # non-decreasing along the order
    run_end = np.append(np.flatnonzero(np.diff(cap)) + 1, n)
    starts = []
    start = 0
    for end in run_end.tolist():  # one step per capacity level, not per batch
        if start >= end:
            continue
        width = int(cap[start])
        count = -(-(end - start) // width)
        starts.append(start + width * np.arange(count, dtype=np.int64))
        start += width * count
    first = np.concatenate(starts)
    assigned = np.searchsorted(first, np.arange(n), side="right") - 1
    if leave_partial and len(first) > 1 and n - first[-1] < cap[first[-1]]:
        assigned[first[-1]:] = -1
    batch_of[order] = assigned
    return batch_of


def padded_capacity(costs: np.ndarray, max_cost: float, max_batch_size: int) -> np.ndarray:
    """How many items a padded batch led by each item may hold (at least 1)."""
    x = np.asarray(costs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cap = np.floor(max_cost / x)
        cap[(x == 0) | np.isnan(cap)] = np.inf
        cap -= (cap * x > max_cost) & np.isfinite(cap)  # the division may round up to the next integer
    cap = np.clip(cap, 1, max_batch_size)
    return cap.astype(np.int64)


def _batch_count(x: np.ndarray, max_cost: float, max_batch_size: int) -> int:
    """How many batches to anchor: no two items above half the cap share one,
    and no fewer than the cost or size lower bound allows."""
    n = len(x)
    if math.isinf(max_cost):
        big = 0
        by_cost = 0
    else:
        big = int(np.count_nonzero(x > max_cost / 2))
        by_cost = math.floor(float(x.sum()) / max_cost) if max_cost > 0 else n
    by_size = math.ceil(n / max_batch_size)
    return min(n, max(1, big, by_cost, by_size))


def _rank_within_runs(values: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal consecutive values."""
    position = np.arange(len(values))
    run_start = np.ones(len(values), bool)
    run_start[1:] = values[1:] != values[:-1]
    return position - np.maximum.accumulate(np.where(run_start, position, 0))


def _first_claimant(claim: np.ndarray, n_slots: int) -> np.ndarray:
    """Positions of the first occurrence of each non-negative value in ``claim``."""
    owner = np.full(n_slots + 1, -1, np.int64)  # slot n_slots absorbs the -1 claims
    reverse = np.arange(len(claim) - 1, -1, -1)
    owner[claim[reverse]] = reverse  # with repeated slots the last write wins: the first claimant
    owner = owner[:n_slots]
    return owner[owner >= 0]

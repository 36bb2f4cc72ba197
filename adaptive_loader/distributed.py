"""Ranks: the gloo group the budget is agreed over, and the agreement itself (mechanics only)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Tuple

import torch

__all__ = ["budget_group", "destroy_budget_group", "agree_on_minimum", "smallest_int", "local_world_size",
           "node_rank", "who_bound", "LIMITS"]

logger = logging.getLogger("adaptive_loader")


def budget_group(replicas: int) -> Any:
    """A gloo group for agreeing on budgets, or None with one replica (or no process group)."""
    if replicas == 1:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        logger.warning("%d replicas but no torch.distributed process group: the budget stays at max_cost, "
                       "the other fallbacks still work", replicas)
        return None
    return dist.new_group(backend="gloo")


def destroy_budget_group(group: Any) -> None:
    """Shut the budget group's gloo threads down when the loader goes, at the latest at exit.

    A group left alive is torn down by libtorch's static destructors after the
    interpreter is gone, which can abort the process at exit. Destroying a
    subgroup is local to this rank; if the whole package was destroyed first,
    the group is already gone."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group(group)
        except ValueError:  # not a known group any more
            pass


def agree_on_minimum(group: Any, *values: float) -> Tuple[float, ...]:
    """The element-wise minimum of ``values`` over the ranks of ``group`` (a collective)."""
    import torch.distributed as dist

    proposal = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(proposal, op=dist.ReduceOp.MIN, group=group)
    return tuple(float(v) for v in proposal)


def smallest_int(group: Any, value: int) -> int:
    """The smallest ``value`` over the ranks of ``group`` (a collective), exact for any int64."""
    import torch.distributed as dist

    proposal = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(proposal, op=dist.ReduceOp.MIN, group=group)
    return int(proposal.item())


def local_world_size() -> int:
    """Ranks on this machine (they share its memory), from torchrun's ``LOCAL_WORLD_SIZE``."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def node_rank() -> int:
    """This rank's node: torchrun's ``GROUP_RANK``, else its rank over the ranks per node."""
    for name, per_node in (("GROUP_RANK", 1), ("RANK", local_world_size())):
        try:
            return int(os.environ[name]) // per_node
        except (KeyError, ValueError):
            continue
    return 0


#: the limits a rank's proposal can come from (the controller's ``Decision.limit``); the last: another one
LIMITS = ("memory", "memory_budget", "/dev/shm", "other")


def who_bound(group: Any, binding: bool, limit: str) -> Dict[str, Any]:
    """Which node, and which of its limits, set an agreed budget (a collective): of the ranks whose
    proposal it was (``binding``), the lowest node, with its rank's limit."""
    code = node_rank() * len(LIMITS) + (LIMITS.index(limit) if limit in LIMITS else len(LIMITS) - 1)
    smallest = smallest_int(group, code if binding else 2**62)
    node, which = divmod(smallest, len(LIMITS))
    return {"bound_by_node": node, "bound_by_limit": LIMITS[which]}

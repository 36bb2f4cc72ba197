"""Turn the user's per-sample costs into a validated float64 array."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np

__all__ = ["as_cost_array"]


def as_cost_array(costs: Any, expected_len: Optional[int] = None) -> Optional[np.ndarray]:
    """Validate ``costs`` and return them as a read-only 1-D float64 array.

    Accepts a list, tuple, numpy array, 1-D tensor, pandas Series, or ``None``
    (returned as ``None``: every sample costs 1). Raises ``TypeError`` for
    non-numeric input and ``ValueError`` for a wrong shape or length, negative,
    NaN or infinite entries, naming the first offending index.
    """
    if costs is None:
        return None
    if isinstance(costs, (str, bytes, numbers.Number)):
        raise TypeError(f"costs must be a sequence of numbers, one per sample, not {type(costs).__name__}")
    raw = _to_numpy(costs)
    if raw.dtype == object or not (
        np.issubdtype(raw.dtype, np.integer)
        or np.issubdtype(raw.dtype, np.floating)
        or raw.dtype == np.bool_
    ):
        raise TypeError(f"costs must be numeric, got dtype {raw.dtype}")
    if raw.ndim != 1:
        raise ValueError(f"costs must be one-dimensional (one number per sample), got shape {raw.shape}")
    if expected_len is not None and len(raw) != expected_len:
        raise ValueError(f"costs has {len(raw)} entries but the dataset has {expected_len} samples")
    arr = raw.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"costs must be finite and non-negative; costs[{i}] = {raw[i].item()!r}"
            f" ({len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} in all)"
        )
    arr.setflags(write=False)
    return arr


def _to_numpy(costs: Any) -> np.ndarray:
    if hasattr(costs, "detach") and hasattr(costs, "cpu"):  # torch.Tensor
        return costs.detach().cpu().numpy()
    if hasattr(costs, "to_numpy"):  # pandas Series / Index
        return costs.to_numpy()
    try:
        return np.asarray(costs)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"costs must be a sequence of numbers: {exc}") from exc

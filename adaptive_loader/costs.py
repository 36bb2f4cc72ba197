"""Per-sample costs and group ids from what users have, as validated arrays.

``as_cost_array`` takes numbers, a callable, or costs of a base dataset seen
through ``Subset``/``ConcatDataset``; ``coco_costs`` counts objects per image
in a COCO annotation file; ``aspect_ratio_groups`` bins image sizes the way
torchvision's detection reference does.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import Counter
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
from torch.utils.data import ConcatDataset, Subset

__all__ = ["as_cost_array", "as_group_array", "aspect_ratio_groups", "coco_costs"]


def as_cost_array(costs: Any, expected_len: Optional[int] = None, dataset: Any = None) -> Optional[np.ndarray]:
    """Validate ``costs`` and return them as a read-only 1-D float64 array.

    Accepts a list, tuple, numpy array, 1-D tensor, pandas Series, a callable
    ``costs(index) -> number`` (called once per index of ``dataset``, or of
    ``range(expected_len)``), or ``None`` (returned as ``None``: every sample
    costs 1). When ``dataset`` is a ``Subset`` (nested or not) or a
    ``ConcatDataset`` and the costs are for the dataset(s) it wraps, they are
    mapped through its indices. Raises ``TypeError`` for non-numeric input and
    ``ValueError`` for a wrong shape or length, negative, NaN or infinite
    entries, naming the first offending index.
    """
    if costs is None:
        return None
    expected_len = _expected_len(expected_len, dataset)
    if callable(costs):
        if expected_len is None:
            raise ValueError("a callable costs needs the number of samples to ask for: give the dataset "
                             "(or expected_len; num_samples for BudgetBatchSampler)")
        raw = _call_each(costs, expected_len)
    else:
        raw = _numeric_1d(costs, "costs", integer=False)
    arr = raw.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"costs must be finite and non-negative; costs[{i}] = {raw[i].item()!r}"
            f" ({len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} in all)"
        )
    arr = _follow_dataset(arr, "costs", expected_len, dataset)
    arr.setflags(write=False)
    return arr


def as_group_array(group_ids: Any, expected_len: Optional[int] = None, dataset: Any = None) -> Optional[np.ndarray]:
    """Validate one integer group id per sample; a read-only int64 array, or ``None`` for ``None``.

    Same containers, lengths and ``Subset``/``ConcatDataset`` mapping as
    :func:`as_cost_array` (no callable). Any ints will do, negative ones too.
    """
    if group_ids is None:
        return None
    expected_len = _expected_len(expected_len, dataset)
    raw = _numeric_1d(group_ids, "group_ids", integer=True)
    arr = _follow_dataset(raw.astype(np.int64), "group_ids", expected_len, dataset)
    arr.setflags(write=False)
    return arr


def aspect_ratio_groups(sizes: Any, k: int = 3) -> np.ndarray:
    """Group ids by aspect ratio, binned as torchvision's ``create_aspect_ratio_groups(dataset, k)``.

    ``sizes`` holds ``(width, height)`` per image. The bin edges are
    ``2 ** np.linspace(-1, 1, 2 * k + 1)`` (``[1.0]`` for ``k=0``) and image
    ``i`` gets the number of edges ``<= width / height``: ``2 * k + 2`` groups,
    0 for the tallest images.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    arr = _to_numpy(sizes, "sizes")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)) or arr.dtype == np.bool_:
        raise TypeError(f"sizes must be numeric (width, height) pairs, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"sizes must have shape (images, 2) as (width, height), got shape {arr.shape}")
    wh = arr.astype(np.float64)
    bad = np.flatnonzero(~np.all(np.isfinite(wh) & (wh > 0), axis=1))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"sizes must be positive and finite; sizes[{i}] = {arr[i].tolist()}")
    edges = 2.0 ** np.linspace(-1, 1, 2 * int(k) + 1) if k > 0 else np.array([1.0])
    return np.searchsorted(edges, wh[:, 0] / wh[:, 1], side="right").astype(np.int64)


def coco_costs(annotations: Any, image_ids: Optional[Sequence[int]] = None, *, skip_crowd: bool = False,
               return_sizes: bool = False):
    """Objects per image from a COCO instances file (a path or the loaded dict).

    Counts the ``annotations`` of each image id, in the order of ``image_ids``
    or else of the file's ``images``. ``skip_crowd`` leaves out
    ``iscrowd`` annotations (as torchvision's COCO reference does).
    ``return_sizes=True`` also returns an ``(images, 2)`` array of
    ``(width, height)``, ready for :func:`aspect_ratio_groups`.
    """
    data = _load_coco(annotations)
    images = data.get("images")
    known = None
    if images is not None:
        if not isinstance(images, list):
            raise ValueError(f"COCO 'images' must be a list, got {type(images).__name__}")
        known = {}
        for j, image in enumerate(images):
            if not isinstance(image, dict) or "id" not in image:
                raise ValueError(f"COCO images[{j}] has no 'id'")
            if image["id"] in known:
                raise ValueError(f"COCO image id {image['id']!r} appears twice in 'images'")
            known[image["id"]] = image
    if image_ids is None:
        if known is None:
            raise ValueError("the COCO data has no 'images' list: give image_ids")
        ids: List[Any] = list(known)
    else:
        ids = [i.item() if hasattr(i, "item") else i for i in image_ids]
        missing = [i for i in ids if known is not None and i not in known]
        if missing:
            raise ValueError(f"image_ids not in the file's images: {missing[:5]} ({len(missing)} in all)")
    counts = _count_annotations(data, known, skip_crowd)
    costs = np.array([counts.get(i, 0) for i in ids], np.int64)
    if not return_sizes:
        return costs
    if known is None:
        raise ValueError("return_sizes=True needs the file's 'images' (with width and height)")
    sizes = np.zeros((len(ids), 2))
    for j, i in enumerate(ids):
        image = known[i]
        if "width" not in image or "height" not in image:
            raise ValueError(f"COCO image {i!r} has no width/height")
        sizes[j] = image["width"], image["height"]
    return costs, sizes


def _load_coco(annotations: Any) -> dict:
    if isinstance(annotations, (str, os.PathLike)):
        with open(annotations, encoding="utf-8") as f:
            annotations = json.load(f)
    if not isinstance(annotations, dict):
        raise TypeError(f"annotations must be a COCO dict or a path to its JSON file, got {type(annotations).__name__}")
    return annotations


def _count_annotations(data: dict, known: Optional[dict], skip_crowd: bool) -> Counter:
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise ValueError("the COCO data has no 'annotations' list")
    counts: Counter = Counter()
    for j, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"COCO annotations[{j}] has no 'image_id'")
        if known is not None and ann["image_id"] not in known:
            raise ValueError(f"COCO annotations[{j}] is for image_id {ann['image_id']!r}, which is not in 'images'")
        if not (skip_crowd and ann.get("iscrowd", 0)):
            counts[ann["image_id"]] += 1
    return counts


def _expected_len(expected_len: Optional[int], dataset: Any) -> Optional[int]:
    if dataset is None:
        return expected_len
    n = len(dataset)
    if expected_len is not None and expected_len != n:
        raise ValueError(f"expected_len {expected_len} but the dataset has {n} samples")
    return n


def _call_each(costs: Callable[[int], Any], n: int) -> np.ndarray:
    values = np.empty(n, np.float64)
    for i in range(n):
        value = costs(i)
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor or array
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"costs({i}) returned {type(value).__name__}, not a number")
        values[i] = value
    return values


def _numeric_1d(values: Any, name: str, integer: bool) -> np.ndarray:
    if isinstance(values, (str, bytes, numbers.Number)):
        raise TypeError(f"{name} must be a sequence of numbers, one per sample, not {type(values).__name__}")
    raw = _to_numpy(values, name)
    if integer:
        if raw.size == 0 and raw.dtype != object:
            raw = raw.astype(np.int64)  # np.asarray([]) is float64
        if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer):
            raise TypeError(f"{name} must be integers, got dtype {raw.dtype}")
    elif raw.dtype == object or not (
        np.issubdtype(raw.dtype, np.integer)
        or np.issubdtype(raw.dtype, np.floating)
        or raw.dtype == np.bool_
    ):
        raise TypeError(f"{name} must be numeric, got dtype {raw.dtype}")
    if raw.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one number per sample), got shape {raw.shape}")
    return raw


def _follow_dataset(arr: np.ndarray, name: str, expected_len: Optional[int], dataset: Any) -> np.ndarray:
    """``arr`` as is when its length is the dataset's, else mapped from the base dataset(s)."""
    if expected_len is None or len(arr) == expected_len:
        return arr
    index = None if dataset is None else _index_map(dataset, len(arr))
    if index is None:
        seen = "" if dataset is None else f"; lengths seen through Subset/ConcatDataset: {_lengths_seen(dataset)}"
        raise ValueError(f"{name} has {len(arr)} entries but the dataset has {expected_len} samples{seen}")
    return arr[index]


def _index_map(dataset: Any, n: int) -> Optional[np.ndarray]:
    """For each index of ``dataset``, its index in an array of ``n`` base costs; ``None`` if none fits."""
    if len(dataset) == n:
        return np.arange(n)
    if isinstance(dataset, Subset):
        inner = _index_map(dataset.dataset, n)
        if inner is None:
            return None
        indices = np.asarray(dataset.indices, dtype=np.int64)
        if len(indices) and not (-len(inner) <= indices.min() and indices.max() < len(inner)):
            raise ValueError(f"a Subset has indices outside its dataset of {len(inner)} samples")
        return inner[indices]
    if isinstance(dataset, ConcatDataset):
        parts = [_index_map(part, n) for part in dataset.datasets]  # all parts over one base
        if all(part is not None for part in parts):
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        bases = [_base_len(part) for part in dataset.datasets]  # or the bases one after another
        if sum(bases) == n:
            offsets = np.cumsum([0, *bases[:-1]])
            parts = [_index_map(part, b) for part, b in zip(dataset.datasets, bases)]
            if all(part is not None for part in parts):
                return np.concatenate([part + off for part, off in zip(parts, offsets)])
    return None


def _base_len(dataset: Any) -> int:
    if isinstance(dataset, Subset):
        return _base_len(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return sum(_base_len(part) for part in dataset.datasets)
    return len(dataset)


def _lengths_seen(dataset: Any) -> List[int]:
    seen = [len(dataset)]
    if isinstance(dataset, Subset):
        seen += _lengths_seen(dataset.dataset)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            seen += _lengths_seen(part)
        base = _base_len(dataset)
        if base != len(dataset):
            seen.append(base)
    return list(dict.fromkeys(seen))


def _to_numpy(values: Any, name: str = "costs") -> np.ndarray:
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor
        return values.detach().cpu().numpy()
    if hasattr(values, "to_numpy"):  # pandas Series / Index
        return values.to_numpy()
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers: {exc}") from exc

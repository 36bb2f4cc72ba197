"""One codec for every road: a batch's structure pickled in memory, its tensors' bytes placed apart.

:func:`encode` pickles a batch with every CPU tensor replaced by a small
description, and lists the bytes the tensors read as *pieces*: one per run of
a storage that its tensors span (views of one storage share a piece, an
expanded tensor costs its storage, not its expansion). The road puts each
piece somewhere (a worker's arena, one shared block, a spill file) and
:func:`decode` builds the batch again on those bytes: the same dtypes,
shapes, strides, subclasses (with their Python attributes), sparse and nested
layouts, and views of one storage again views of one storage.

What the codec cannot take apart (tensors off the CPU, quantized ones,
wrapper subclasses without a storage) is left to torch's own pickling: with
``share=True`` through :class:`~multiprocessing.reduction.ForkingPickler`
(torch's reducers, shm and fds), with ``share=False`` by value.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _torch
from .arena import ALIGN
from .measure import byte_span

__all__ = ["Encoded", "encode", "decode", "aligned", "piece_views"]

# Views of one storage farther apart than this (and than the bytes they span) become pieces of their
# own: rows of a dataset-wide tensor must not carry the whole dataset.
_MERGE_GAP = 4096

_JAGGED = _torch.JAGGED
_LAYOUTS = {str(layout): layout for layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc,
                                                  torch.strided, _JAGGED) if layout is not None}


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment every piece starts on."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass
class Encoded:
    """A batch taken apart: ``structure`` (the pickle), ``pieces`` (uint8 tensors: the bytes to place),
    ``tensors`` (how each placed tensor sits on its piece), ``shared`` (tensors torch passes itself)."""

    structure: bytes
    pieces: List[torch.Tensor]
    tensors: List[tuple]
    shared: List[torch.Tensor] = field(default_factory=list)

    @property
    def sizes(self) -> List[int]:
        return [int(p.numel()) for p in self.pieces]

    @property
    def nbytes(self) -> int:
        """Bytes the pieces take, each aligned."""
        return sum(aligned(n) for n in self.sizes)

    @property
    def shared_handles(self) -> int:
        """Distinct storages among ``shared``: the fds torch passes for them."""
        return len({t.untyped_storage().data_ptr() for t in self.shared})

    def packed_offsets(self) -> List[int]:
        """Offsets of the pieces laid out one after another, aligned."""
        offsets, at = [], 0
        for n in self.sizes:
            offsets.append(at)
            at += aligned(n)
        return offsets


class _Pickler(ForkingPickler):
    def __init__(self, file: io.BytesIO, share: bool) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        if not share:  # torch's multiprocessing reducers would put storages in shm: pickle by value instead
            self.dispatch_table = copyreg.dispatch_table.copy()
        self.share = share
        self.dense: List[torch.Tensor] = []
        self.shared: List[torch.Tensor] = []
        self._pids: Dict[int, Optional[tuple]] = {}
        self._keep: List[Any] = []  # parts made while pickling: their ids must not be reused meanwhile

    def persistent_id(self, obj: Any) -> Optional[tuple]:
        if not isinstance(obj, torch.Tensor):
            return None
        key = id(obj)
        if key not in self._pids:
            self._keep.append(obj)
            self._pids[key] = self._describe(obj)
        return self._pids[key]

    def _describe(self, t: torch.Tensor) -> Optional[tuple]:
        if not t.is_cpu or (t.requires_grad and not t.is_leaf):
            return None  # torch's own reducer: it refuses non-leaf tensors that require grad, as vanilla does
        if t.is_nested:
            parts = _nested_parts(t)
            return None if parts is None else ("nested", str(t.layout), parts, t.requires_grad)
        if t.layout == torch.sparse_coo:
            indices, values = _torch.coo_parts(t)
            return ("coo", indices, values, tuple(t.shape), t.is_coalesced(), t.requires_grad)
        if t.layout in (torch.sparse_csr, torch.sparse_bsr):
            return ("compressed", str(t.layout), t.crow_indices(), t.col_indices(), t.values(), tuple(t.shape),
                    t.requires_grad)
        if t.layout in (torch.sparse_csc, torch.sparse_bsc):
            return ("compressed", str(t.layout), t.ccol_indices(), t.row_indices(), t.values(), tuple(t.shape),
                    t.requires_grad)
        if t.layout != torch.strided or t.is_quantized:
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass with no storage of its own
            return None
        subclass = type(t) is not torch.Tensor
        # the storage's flag is Tensor.is_shared()'s answer, at a tenth of its cost (~0.2 us, not 1.8)
        if not subclass and self.share and not t.requires_grad and storage.is_shared():
            self.shared.append(t)
            return ("shared", len(self.shared) - 1)
        state = _torch.tensor_state(t) if subclass else None
        data = t.resolve_neg() if t.is_neg() else t
        self.dense.append(data)
        return ("dense", len(self.dense) - 1, type(t) if subclass else None, state, t.requires_grad, t.is_conj())


def _nested_parts(t: torch.Tensor) -> Optional[list]:
    if _JAGGED is not None and t.layout == _JAGGED:
        if t.lengths() is not None:
            return None  # a non-contiguous jagged tensor: torch's own pickling
        return [t.values(), t.offsets()]
    return list(t.unbind())


def encode(batch: Any, share: bool) -> Encoded:
    """Take ``batch`` apart. Nothing is copied and nothing touches shm or fds here, except, with
    ``share``, what torch's reducers do for tensors the codec leaves to them."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, share)
    pickler.dump(batch)
    pieces, tensors = _pieces(pickler.dense)
    return Encoded(buffer.getvalue(), pieces, tensors, pickler.shared)


def _pieces(dense: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[tuple]]:
    """One piece per run of a storage its tensors span; where each tensor sits on its piece."""
    tensors: List[tuple] = [()] * len(dense)
    by_storage: Dict[int, List[Tuple[int, int, int]]] = {}
    for i, t in enumerate(dense):
        if t.numel() == 0:
            tensors[i] = (-1, 0, t.dtype, tuple(t.shape), t.stride())
            continue
        lo, hi = byte_span(t)
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((lo, hi, i))
    pieces: List[torch.Tensor] = []
    for spans in by_storage.values():
        spans.sort()
        run: List[Tuple[int, int, int]] = []
        end = 0
        for lo, hi, i in spans + [(None, None, None)]:
            if run and (lo is None or lo > end + max(_MERGE_GAP, end - run[0][0])):
                start = run[0][0] // ALIGN * ALIGN  # element offsets stay whole for every itemsize
                storage = dense[run[0][2]].untyped_storage()
                pieces.append(torch.empty(0, dtype=torch.uint8).set_(storage, start, (end - start,), (1,)))
                for r_lo, _, r_i in run:
                    t = dense[r_i]
                    tensors[r_i] = (len(pieces) - 1, (r_lo - start) // t.element_size(), t.dtype, tuple(t.shape),
                                    t.stride())
                run = []
            if lo is not None:
                end = hi if not run else max(end, hi)
                run.append((lo, hi, i))
    return pieces, tensors


def piece_views(base: np.ndarray, offsets: Sequence[int], sizes: Sequence[int]) -> List[np.ndarray]:
    """The pieces as uint8 arrays of ``base``, each keeping ``base`` itself alive (not only the memory
    under it: an arena's room comes back when ``base`` is gone)."""
    whole = memoryview(base)
    if any(o < 0 or o + n > len(whole) for o, n in zip(offsets, sizes)):
        raise ValueError(f"pieces run past the {len(whole)} B they were sent in")
    return [np.frombuffer(whole[o:o + n], dtype=np.uint8) for o, n in zip(offsets, sizes)]


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, dense: List[torch.Tensor], shared: List[torch.Tensor]) -> None:
        super().__init__(file)
        self.dense = dense
        self.shared = shared

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        kind = pid[0]
        if kind == "dense":
            _, i, cls, state, requires_grad, conj = pid
            t = self.dense[i]
            if conj:
                t = t.conj()
            if cls is not None:
                t = _torch.restore_tensor_state(t.as_subclass(cls), state)
            return t.requires_grad_() if requires_grad else t
        if kind == "shared":
            return self.shared[pid[1]]
        if kind == "coo":
            _, indices, values, shape, coalesced, requires_grad = pid
            t = torch.sparse_coo_tensor(indices, values, shape, is_coalesced=coalesced)
        elif kind == "compressed":
            _, layout, compressed, plain, values, shape, requires_grad = pid
            t = torch.sparse_compressed_tensor(compressed, plain, values, shape, layout=_LAYOUTS[layout])
        elif kind == "nested":
            _, layout, parts, requires_grad = pid
            if _LAYOUTS[layout] is _JAGGED:
                t = torch.nested.nested_tensor_from_jagged(parts[0], parts[1])
            else:
                t = torch.nested.as_nested_tensor(parts)  # strided (torch 2.1 takes no layout)
        else:
            raise pickle.UnpicklingError(f"unknown tensor place {kind!r}")
        return t.requires_grad_() if requires_grad else t


def decode(structure: bytes, tensors: Sequence[tuple], pieces: Sequence[np.ndarray],
           shared: Sequence[torch.Tensor] = ()) -> Any:
    """The batch again, its tensors on ``pieces`` (uint8 arrays, in the order :func:`encode` listed them)."""
    storages = [torch.from_numpy(p).untyped_storage() for p in pieces]
    dense = []
    for piece, offset, dtype, shape, stride in tensors:
        if piece < 0:
            dense.append(torch.empty_strided(shape, stride, dtype=dtype))
        else:
            dense.append(torch.empty(0, dtype=dtype).set_(storages[piece], offset, shape, stride))
    return _Unpickler(io.BytesIO(structure), dense, list(shared)).load()

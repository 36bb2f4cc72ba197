"""Every tensor kind torch can pickle arrives as it was sent, on every road.

A property-based round trip (hypothesis) over dtypes, strides, views of one storage, expanded
tensors, tensor subclasses with attributes, sparse COO/CSR and nested tensors, in nested
containers, through each road (arena in a memfd and in /dev/shm, one shared block, spill file,
in-process); and real DataLoaders: what each road delivers is compared with what vanilla
DataLoader delivers for the same samples.
"""

import os
import random
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data._utils import worker as torch_worker

from adaptive_loader.pipeline import measured_collate
from adaptive_loader import _torch
from adaptive_loader.arena import Arena, RingWriter, registry
from adaptive_loader.kinds import ARENA_ROADS, Road
from adaptive_loader.measure import footprint
from adaptive_loader.region import memfd_available
from adaptive_loader.transport import (FILE, MeasuredCollate, pack_batch, pack_into_arena, unpack_batch,
                                       unpack_from_arena)

warnings.filterwarnings("ignore", category=UserWarning)  # sparse/nested/complex32 "beta" notices
needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")
KINDS = ["memfd", "shm"] if memfd_available() else ["shm"]


class Boxes(torch.Tensor):
    """Like torchvision's tv_tensors.BoundingBoxes: a tensor with Python attributes."""

    @staticmethod
    def __new__(cls, data, *, format, canvas_size):
        boxes = data.as_subclass(cls)
        boxes.format = format
        boxes.canvas_size = canvas_size
        return boxes


#: Every dtype this torch has (uint16/32/64 came in 2.3, the float8s in 2.1).
DTYPES = [getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool", "complex64",
    "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "complex32") if hasattr(torch, name)]

#: Nested tensors' layouts this torch has (jagged came in 2.2).
NESTED_LAYOUTS = [torch.strided] + ([torch.jagged] if hasattr(torch, "jagged") else [])



def nested_tensor(parts, layout):
    """torch 2.1's nested_tensor takes no layout (every one is strided)."""
    if layout is torch.strided:
        return torch.nested.nested_tensor(parts)
    return torch.nested.nested_tensor(parts, layout=layout)


def _base(rng, dtype, n):
    values = torch.tensor([rng.randrange(0, 8) for _ in range(n)], dtype=torch.int64)
    if dtype == torch.complex32:
        return values.to(torch.complex64).to(torch.complex32)
    return values.to(dtype)


def make_leaf(rng, kind, dtype):
    """One tensor (or a few views of one storage) of ``kind``."""
    if kind == "plain":
        return _base(rng, dtype, rng.randrange(0, 12))
    if kind == "views":  # views of one storage: they must stay views of one storage
        base = _base(rng, dtype, 24)
        grid = base.view(4, 6)
        return [base, base[3:11], grid.t(), grid[:, ::2], base[5]]
    if kind == "expanded":
        return _base(rng, dtype, 4).expand(rng.randrange(1, 500), 4)
    if kind == "subclass":
        return Boxes(_base(rng, dtype, 8).view(2, 4), format=rng.choice(["XYXY", "XYWH"]),
                     canvas_size=(rng.randrange(1, 99), rng.randrange(1, 99)))
    if kind == "coo":
        i = torch.tensor([[0, 1, 1, 2], [2, 0, 2, 1]])
        coo = torch.sparse_coo_tensor(i, torch.arange(4, dtype=torch.float32), (3, 3))
        return coo.coalesce() if rng.random() < 0.5 else coo
    if kind == "csr":
        return (torch.eye(4) * rng.randrange(1, 9)).to_sparse_csr()
    if kind == "nested":
        parts = [torch.full((rng.randrange(1, 4), 3), float(k)) for k in range(rng.randrange(1, 4))]
        return nested_tensor(parts, rng.choice(NESTED_LAYOUTS))
    raise ValueError(kind)


LEAF_KINDS = ["plain", "views", "expanded", "subclass", "coo", "csr", "nested"]


def make_sample(rng, kinds_and_dtypes, nest):
    leaves = [make_leaf(rng, k, d) for k, d in kinds_and_dtypes]
    if nest == "dict":
        return {f"k{i}": leaf for i, leaf in enumerate(leaves)}
    if nest == "deep":
        return {"outer": [tuple(leaves), {"more": leaves[:1]}], "label": "x"}
    return leaves


# -- comparison ---------------------------------------------------------------------------------------

def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).tolist()


def _strided_leaves(obj, out):
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.strided and not obj.is_nested:
            out.append(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            _strided_leaves(obj[k], out)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _strided_leaves(x, out)
    return out


def assert_faithful(expected, got):
    """``got`` is ``expected``: structure, types, dtypes, shapes, strides, values, subclass attributes,
    sparse and nested layouts, and which tensors share a storage (at the same distance)."""
    _assert_same(expected, got)
    a, b = _strided_leaves(expected, []), _strided_leaves(got, [])
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if a[i].numel() == 0 or a[j].numel() == 0:
                continue
            same = a[i].untyped_storage().data_ptr() == a[j].untyped_storage().data_ptr()
            assert same == (b[i].untyped_storage().data_ptr() == b[j].untyped_storage().data_ptr()), (i, j)
            if same:
                assert a[j].data_ptr() - a[i].data_ptr() == b[j].data_ptr() - b[i].data_ptr(), (i, j)


def _assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.layout, a.requires_grad, a.is_nested) == (b.dtype, b.layout, b.requires_grad, b.is_nested)
        if a.is_nested:  # a jagged shape holds a symbol of its own per tensor: compare the components
            assert [x.shape for x in a.unbind()] == [y.shape for y in b.unbind()]
            for x, y in zip(a.unbind(), b.unbind()):
                assert _bytes(x) == _bytes(y)
            return
        assert a.shape == b.shape
        assert getattr(a, "__dict__", {}) == getattr(b, "__dict__", {})
        if a.layout == torch.sparse_coo:
            assert a.is_coalesced() == b.is_coalesced()
            for x, y in zip(_torch.coo_parts(a), _torch.coo_parts(b)):
                assert _bytes(x) == _bytes(y)
        elif a.layout == torch.sparse_csr:
            for x, y in zip((a.crow_indices(), a.col_indices(), a.values()),
                            (b.crow_indices(), b.col_indices(), b.values())):
                assert _bytes(x) == _bytes(y)
        else:
            assert a.stride() == b.stride()
            assert _bytes(a) == _bytes(b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# -- the roads, in this process ---------------------------------------------------------------------------

class _Worker:
    id, num_workers = 0, 1


def _first(samples):
    return samples[0]


def through(road, batch, tmp_path):
    if road == "inline":
        collate = measured_collate(_first, "/dev/shm", str(tmp_path))
        return collate([batch]).open()
    if road.startswith("block-"):
        return unpack_batch(pack_batch(batch, road[len("block-"):])[0])
    if road.startswith("arena-"):
        owner = f"fidelity-{road}"
        arena = Arena.create(1 << 20, kind=road[len("arena-"):])
        writer = RingWriter(arena)
        try:
            writer.begin(4096)
            out = unpack_from_arena(pack_into_arena(batch, writer, arena, owner, 0)[0])
        finally:
            registry.forget(owner)
        return out
    assert road == "file"
    saved = torch_worker._worker_info
    torch_worker._worker_info = _Worker()
    try:
        collate = measured_collate(_first, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
        envelope = collate([batch])
    finally:
        torch_worker._worker_info = saved
    assert envelope.stats.transport == FILE
    return envelope.open()


ROADS = ["inline", "file"] + [f"block-{k}" for k in KINDS] + [f"arena-{k}" for k in KINDS]


@needs_dev_shm
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       leaves=st.lists(st.tuples(st.sampled_from(LEAF_KINDS), st.sampled_from(DTYPES)), min_size=1, max_size=5),
       nest=st.sampled_from(["list", "dict", "deep"]))
def test_every_road_delivers_every_tensor_kind_as_it_was_sent(tmp_path_factory, seed, leaves, nest):
    tmp_path = tmp_path_factory.mktemp("fidelity")
    batch = make_sample(random.Random(seed), leaves, nest)
    for road in ROADS:
        assert_faithful(batch, through(road, batch, tmp_path))


def test_an_expanded_tensor_costs_its_storage_not_its_expansion(tmp_path):
    expanded = torch.zeros(4).expand(1000, 4)
    assert footprint(expanded, own_bytes=True) == (16, 1)
    data, _ = pack_batch([expanded], KINDS[0])
    out = unpack_batch(data)[0]
    assert out.stride() == (0, 1) and out.untyped_storage().nbytes() == 16
    assert torch.equal(out, expanded)


def test_footprint_of_sparse_and_nested_tensors_counts_their_parts():
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0]), (2, 2))
    assert footprint(coo) == (2 * 2 * 8 + 2 * 4, 2)
    nested = nested_tensor([torch.zeros(2, 3), torch.ones(4, 3)], NESTED_LAYOUTS[-1])
    offsets = 3 * 8 if NESTED_LAYOUTS[-1] is not torch.strided else 0  # a jagged tensor's offsets
    assert footprint(nested, own_bytes=True)[0] == 6 * 3 * 4 + offsets


# -- real DataLoaders: each road against vanilla ---------------------------------------------------------

class RichSamples(Dataset):
    def __init__(self, n=8):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = random.Random(i)
        # vanilla itself cannot rebuild a subclass of the bit-width-only dtypes (torch 2.13: "UntypedStorage
        # has no attribute _untyped_storage"): those go through our roads in the property test above
        kinds = [(k, rng.choice(DTYPES[:12] if k == "subclass" else DTYPES)) for k in LEAF_KINDS]
        return make_sample(rng, kinds, ["list", "dict", "deep"][i % 3])


def _as_list(samples):
    return list(samples)


def _deliveries(collate, workers=1):
    """What the loader delivers, each envelope opened as it arrives (while its worker lives)."""
    loader = DataLoader(RichSamples(), batch_size=2, num_workers=workers, collate_fn=collate, timeout=60 if workers else 0)
    for item in loader:
        yield (item.stats.transport, item.open()) if hasattr(item, "stats") else (None, item)


@needs_dev_shm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("road", ["arena-memfd", "arena-shm", "block", "file"])
def test_each_road_delivers_what_vanilla_dataloader_delivers(tmp_path, road):
    if road == "arena-memfd" and not memfd_available():
        pytest.skip("no memfd_create on this system")
    # The reference is DataLoader in the main process: torch 2.1's workers cannot send sparse tensors at
    # all (their feeder thread fails on "Cannot access storage of SparseTensorImpl" and the loader waits).
    vanilla = [batch for _, batch in _deliveries(_as_list, workers=0)]
    kwargs = {"arena_kind": "shm"}
    if road.startswith("arena"):
        kwargs = {"arena_owner": f"vanilla-{road}", "arena_kind": road.split("-")[1]}
    elif road == "file":
        kwargs["shm_keep_free"] = 1 << 62
    collate = measured_collate(_as_list, "/dev/shm", str(tmp_path), **kwargs)
    roads = []
    try:
        for expected, (road_taken, batch) in zip(vanilla, _deliveries(collate)):
            roads.append(road_taken)
            assert_faithful(expected, batch)
    finally:
        registry.forget(f"vanilla-{road}")
    wanted = {"arena-memfd": {Road.MEMFD}, "arena-shm": {Road.ARENA}, "block": {Road.SHM}, "file": {Road.FILE}}
    assert len(roads) == 4 and set(roads) == wanted[road]


class SubclassSamples(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"boxes": Boxes(torch.full((3, 4), float(i)), format="XYXY", canvas_size=(32, 32)),
                "image": torch.full((3, 8, 8), float(i))}


@needs_dev_shm
@pytest.mark.timeout(300)
def test_tensor_subclasses_go_through_the_arena_every_epoch(tmp_path):
    """The tv_tensors case: a subclass batch used to leave the arena for fresh shm (torch's own
    pickling of a subclass), which a small /dev/shm full of arenas then refused: off to spill files.
    Now its bytes are in the ring, and the ring's room comes back when the batch is dropped."""
    owner = "subclass-epochs"
    collate = measured_collate(default_collate, "/dev/shm", str(tmp_path), arena_owner=owner, workers=1)
    loader = DataLoader(SubclassSamples(), batch_size=4, num_workers=1, collate_fn=collate,
                        persistent_workers=True, timeout=60)
    vanilla = list(DataLoader(SubclassSamples(), batch_size=4, num_workers=1, timeout=60))
    roads = []
    try:
        for _ in range(3):
            for expected, envelope in zip(vanilla, loader):
                roads.append(envelope.stats.transport)
                batch = envelope.open()
                assert_faithful(expected, batch)
                assert not batch["boxes"].is_shared()  # not torch's fresh shm: a view of the arena
                del batch
    finally:
        del loader
        registry.forget(owner)
    assert len(roads) == 12 and set(roads) <= set(ARENA_ROADS)

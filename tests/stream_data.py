"""Streams for the tests: IterableDatasets made with the real clients (WebDataset, Hugging Face
``datasets``) and plain generator streams, each sample checkable by its content, not only its key.

Imported by the tests as ``from stream_data import ...`` (tests/ has no ``__init__.py``, so pytest
puts tests/ on ``sys.path``; a script elsewhere inserts tests/ itself, as
tests/benchmarks/stream_webdataset.py does). Every dataset here pickles (fork and spawn both work)
and every sample is made of tensors, ints, strs and dicts.

What is here
------------
* :func:`write_detection_shards` / :func:`webdataset_detection` / :func:`check_detection_sample`:
  a COCO-style detection set in WebDataset tar shards and the pipeline a user would write for it
  (JPEG decoded with PIL, one uint8 mask per polygon drawn with PIL ``ImageDraw``).
* :func:`hf_stream` / :func:`check_hf_sample`: an HF ``datasets.IterableDataset`` of torch tensors.
* :class:`CountingStream` / :class:`UnseededStream` / :func:`check_counting_sample`: plain
  generator streams split by rank and by DataLoader worker; the second's order is not reproducible.
* :func:`tuple_collate`, :func:`list_collate`: collates defined at module level (they pickle).

Findings about the clients (webdataset 1.0.2, datasets 5.2.0, torch 2.13.0+cpu)
-------------------------------------------------------------------------------
WebDataset 1.0.2
  * ``wds.WebDataset(urls, ..., shardshuffle=None, nodesplitter=single_node_only,
    workersplitter=split_by_worker, empty_check=True, seed=None, ...)``: the keyword names are
    ``nodesplitter`` and ``workersplitter``; the functions are ``wds.split_by_node`` and
    ``wds.split_by_worker``. ``shardshuffle`` left at None warns; ``False`` keeps shard order.
  * Both splitters split *shards* (``islice(urls, index, None, count)``), not samples: with 8 shards,
    2 ranks and 2 workers each, every worker reads 2 whole shards. A worker (or rank) left with no
    shard raises ``ValueError("No samples found in dataset; perhaps you have fewer shards than
    workers")`` at the end of its iteration, because ``empty_check=True`` by default.
  * Rank and worker come from ``webdataset.utils.pytorch_worker_info``: ``RANK``/``WORLD_SIZE`` in
    the environment win over ``torch.distributed``; ``WORKER``/``NUM_WORKERS`` in the environment
    win over ``torch.utils.data.get_worker_info()``. The default ``single_node_only`` raises when
    world_size > 1, so a multi-rank job must pass ``nodesplitter=wds.split_by_node``.
  * ``WebDataset`` is a ``torch.utils.data.IterableDataset``; it pickles when every ``.map()``
    function does (module-level functions or ``functools.partial`` of them; no lambdas for spawn).
  * It has no ``state_dict()``/``load_state_dict()``: a stream position cannot be saved or restored.
  * ``.decode("pil")`` gives RGB ``PIL.Image`` objects for ``.jpg`` and already parses ``.json``.
  * It does not close the tar files it opens (``python -X dev`` shows a ResourceWarning per shard,
    also after a full pass): they are closed when garbage collected, each worker holding one at a time.

HF datasets 5.2.0
  * ``Dataset.from_dict(...).with_format("torch").to_iterable_dataset(num_shards=k)`` and
    ``.to_iterable_dataset(num_shards=k).with_format("torch")`` both yield torch tensors (an int
    column becomes a 0-d int64 tensor, a list column a 1-d int64 tensor of that row's length).
  * ``datasets.IterableDataset`` becomes a ``torch.utils.data.IterableDataset`` subclass at run time
    (the parent class is added when torch is importable, and again on unpickling).
  * Worker sharding: in a DataLoader worker it iterates only its shards,
    ``shards[worker_id::num_workers]`` (non-contiguous). 200 rows in 4 shards of 50 with 2 workers:
    worker 0 reads ids 0-49 and 100-149, worker 1 reads 50-99 and 150-199; the DataLoader's
    round robin interleaves them (0, 50, 1, 51, ...). More workers than shards: the extra workers
    yield nothing and worker 0 logs a "Too many dataloader workers" warning.
  * ``state_dict()``/``load_state_dict()`` exist and resume exactly (no shuffle buffer here) when
    iterated in one process. Inside a worker, ``state_dict()`` works and describes that worker's
    position *within its own shard subset* (its ``shard_idx`` counts its own shards); the copy in
    the main process never advances when workers iterate (its state stays at the start). A state
    given to ``load_state_dict()`` in the main process is pickled to every worker and each applies
    it to its own subset: resuming with workers needs one state per worker, each loaded in its
    worker (what torchdata's ``StatefulDataLoader`` does); one worker's state loaded into the
    main-process dataset skips the same count in every worker. ``set_epoch()`` exists.
  * Spawned workers re-import ``datasets`` (several seconds each on 2 cores).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "MAX_OBJECTS", "DIGESTS_FILE", "detection_objects", "detection_jpeg", "detection_annotations",
    "write_detection_shards", "webdataset_detection", "detection_sample", "objects", "detection_digest",
    "expected_detection", "load_digests", "check_detection_sample",
    "hf_stream", "hf_length", "check_hf_sample",
    "CountingStream", "UnseededStream", "counting_length", "counting_keys", "check_counting_sample",
    "tuple_collate", "list_collate",
]

MAX_OBJECTS = 150
DIGESTS_FILE = "digests.json"


# --------------------------------------------------------------------------------------------------
# collates

def tuple_collate(batch: List[Any]) -> tuple:
    """``tuple(zip(*batch))``: for tuple samples, a tuple of per-field tuples (detection's collate)."""
    return tuple(zip(*batch))


def list_collate(batch: List[Any]) -> List[Any]:
    """The samples as they are, in a list (for dict samples)."""
    return list(batch)


# --------------------------------------------------------------------------------------------------
# detection shards (WebDataset)

def detection_objects(index: int, seed: int = 0, max_objects: int = MAX_OBJECTS) -> int:
    """How many objects (polygons, hence masks) image ``index`` has: 1..``max_objects``.

    Uneven on purpose, as in COCO: ``1 + floor((max_objects - 1) * u**3)`` with ``u`` uniform per
    key (about a fifth of the images have 1 object, the mean is near ``max_objects / 4``), and every
    image with ``index % 40 == 7`` has exactly ``max_objects`` (one per 40, so each shard of the
    default 8 x 40 has one, and any 8 consecutive images do not all have it).
    """
    if index % 40 == 7:
        return max_objects
    u = np.random.default_rng((seed, index, 1)).random()
    return 1 + int((max_objects - 1) * u ** 3)


def detection_jpeg(index: int, seed: int = 0, size: Tuple[int, int] = (320, 240)) -> bytes:
    """Image ``index`` as JPEG bytes (quality 85): a gradient stamped with the index and seed.
    ``size`` is (width, height), as PIL has it. Deterministic for a given Pillow build."""
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    shift = (index * 37 + seed * 101) % 256
    pixels = np.stack([(x + index) % 256, (y * 2 + shift) % 256, np.full_like(x, (index * 7 + seed) % 256)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def detection_annotations(index: int, seed: int = 0, size: Tuple[int, int] = (320, 240),
                          max_objects: int = MAX_OBJECTS) -> Dict[str, Any]:
    """Image ``index``'s COCO-style record (what its ``.json`` holds): ``image_id``, ``width``,
    ``height`` and ``annotations``, one per object with ``segmentation`` (one polygon, a flat
    ``[x0, y0, x1, y1, ...]`` list of 8 points), ``bbox`` (COCO's ``[x, y, w, h]``) and
    ``category_id`` (1..80)."""
    width, height = size
    rng = np.random.default_rng((seed, index, 2))
    margin = min(20.0, width / 4, height / 4)
    radius = max(2.0, min(40.0, width / 4, height / 4))
    annotations = []
    for _ in range(detection_objects(index, seed, max_objects)):
        cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
        radii = rng.uniform(radius / 8, radius, 8)
        xs = np.round(np.clip(cx + radii * np.cos(angles), 0, width - 1), 2)
        ys = np.round(np.clip(cy + radii * np.sin(angles), 0, height - 1), 2)
        x0, y0 = float(xs.min()), float(ys.min())
        annotations.append({
            "segmentation": [np.stack([xs, ys], axis=1).ravel().tolist()],
            "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
            "category_id": int(rng.integers(1, 81)),
        })
    return {"image_id": index, "width": width, "height": height, "annotations": annotations}


def write_detection_shards(directory: str, shards: int = 8, images: int = 320, seed: int = 0,
                           size: Tuple[int, int] = (320, 240), max_objects: int = MAX_OBJECTS,
                           digests: bool = True) -> List[str]:
    """Write ``images`` samples in ``shards`` WebDataset tars ``directory/shard-000000.tar``, ...
    (contiguous runs of keys, as ``wds.ShardWriter`` makes them) and return their paths in order.

    Sample ``i`` has key ``f"{i:06d}"``, ``.jpg`` (:func:`detection_jpeg`) and ``.json``
    (:func:`detection_annotations`, 1..``max_objects`` polygons). With ``digests`` (the default)
    ``directory/digests.json`` maps each key to :func:`expected_detection`'s digest of the sample the
    pipeline must deliver, computed here from the JPEG bytes just written (it costs about one
    decoded epoch); read it back with :func:`load_digests`. ``sorted(glob)`` or the returned list,
    or the brace URL ``f"{directory}/shard-{{000000..{shards - 1:06d}}}.tar"``, all name the shards.
    """
    import webdataset as wds

    if shards < 1 or images < 0:
        raise ValueError(f"need shards >= 1 and images >= 0, got shards={shards}, images={images}")
    os.makedirs(directory, exist_ok=True)
    paths, expected = [], {}
    bounds = np.linspace(0, images, shards + 1).round().astype(int)
    for s in range(shards):
        path = os.path.join(directory, f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(bounds[s], bounds[s + 1]):
                key = f"{i:06d}"
                jpeg = detection_jpeg(i, seed, size)
                record = detection_annotations(i, seed, size, max_objects)
                sink.write({"__key__": key, "jpg": jpeg, "json": json.dumps(record).encode()})
                if digests:
                    expected[key] = _digest_of_record(key, jpeg, record)
        paths.append(path)
    if digests:
        with open(os.path.join(directory, DIGESTS_FILE), "w") as f:
            json.dump(expected, f)
    return paths


def webdataset_detection(urls: Union[str, Sequence[str]], *, decode_masks: bool = True, **webdataset_kwargs):
    """The pipeline a user would write for :func:`write_detection_shards`' shards::

        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                       workersplitter=wds.split_by_worker)
           .decode("pil").to_tuple("__key__", "jpg", "json").map(detection_sample)

    Each sample is ``(key, image, target)`` (see :func:`detection_sample`). ``decode_masks=False``
    leaves the masks out (``target["polygons"]`` instead: cheap, for tests that only count).
    ``webdataset_kwargs`` go to ``wds.WebDataset`` and replace the ones above (e.g.
    ``empty_check=False`` for more workers than shards).
    """
    import webdataset as wds

    kwargs = dict(shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
    kwargs.update(webdataset_kwargs)
    urls = list(urls) if not isinstance(urls, str) else urls
    mapper = detection_sample if decode_masks else functools.partial(detection_sample, decode_masks=False)
    return wds.WebDataset(urls, **kwargs).decode("pil").to_tuple("__key__", "jpg", "json").map(mapper)


def _rasterize(record: Dict[str, Any], width: int, height: int) -> np.ndarray:
    """One uint8 mask (0/1) per annotation, its polygon filled with PIL ``ImageDraw``: [N, H, W]."""
    from PIL import Image, ImageDraw

    masks = np.zeros((len(record["annotations"]), height, width), dtype=np.uint8)
    for k, annotation in enumerate(record["annotations"]):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in annotation["segmentation"]:
            draw.polygon(polygon, fill=1)
        masks[k] = np.asarray(canvas)
    return masks


def _boxes(record: Dict[str, Any]) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` boxes as torchvision's ``[x0, y0, x1, y1]``, float32 [N, 4]."""
    boxes = torch.tensor([a["bbox"] for a in record["annotations"]], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def detection_sample(fields, decode_masks: bool = True):
    """The ``.map()`` step: ``(key, PIL image, json record)`` to ``(key, image, target)``.

    ``image``: uint8 [3, H, W], a ``permute`` view of the HWC pixels as torchvision's
    ``pil_to_tensor`` gives it (not contiguous). ``target``: ``image_id`` (int64 scalar), ``boxes``
    (float32 [N, 4], x0 y0 x1 y1), ``labels`` (int64 [N]), ``masks`` (uint8 [N, H, W], 0/1) or, with
    ``decode_masks=False``, ``polygons`` (the list of flat polygons) instead.
    """
    key, picture, record = fields
    pixels = torch.from_numpy(np.array(picture.convert("RGB"), dtype=np.uint8, copy=True))
    image = pixels.permute(2, 0, 1)
    height, width = pixels.shape[:2]
    target = {
        "image_id": torch.tensor(int(record["image_id"])),
        "boxes": _boxes(record),
        "labels": torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.int64),
    }
    if decode_masks:
        target["masks"] = torch.from_numpy(_rasterize(record, width, height))
    else:
        target["polygons"] = [a["segmentation"][0] for a in record["annotations"]]
    return key, image, target


def objects(sample) -> int:
    """The cost of a detection sample: its number of objects (masks)."""
    target = sample[2]
    return int(target["masks"].shape[0]) if "masks" in target else int(target["boxes"].shape[0])


def _sha(tensor_or_array) -> str:
    array = tensor_or_array.contiguous().numpy() if isinstance(tensor_or_array, torch.Tensor) else tensor_or_array
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]


def detection_digest(sample) -> Dict[str, Any]:
    """What identifies a delivered detection sample's content: key, image shape, object count and
    SHA-256 (truncated) of the image (CHW bytes), masks, boxes and labels. A sample made with
    ``decode_masks=False`` has ``masks_sha256`` None."""
    key, image, target = sample
    return {
        "key": key,
        "image_shape": list(image.shape),
        "objects": objects(sample),
        "image_sha256": _sha(image),
        "masks_sha256": _sha(target["masks"]) if "masks" in target else None,
        "boxes_sha256": _sha(target["boxes"]),
        "labels_sha256": _sha(target["labels"]),
        "image_id": int(target["image_id"]),
    }


def _digest_of_record(key: str, jpeg: bytes, record: Dict[str, Any]) -> Dict[str, Any]:
    from PIL import Image

    return detection_digest(detection_sample((key, Image.open(io.BytesIO(jpeg)), record)))


def expected_detection(key: str, *, seed: int = 0, size: Tuple[int, int] = (320, 240),
                       max_objects: int = MAX_OBJECTS) -> Dict[str, Any]:
    """The digest (:func:`detection_digest`) that the sample with ``key`` must have, recomputed
    from scratch (encodes and decodes its JPEG, draws its masks: a few ms to tens of ms)."""
    index = int(key)
    return _digest_of_record(key, detection_jpeg(index, seed, size),
                             detection_annotations(index, seed, size, max_objects))


def load_digests(where: str) -> Dict[str, Dict[str, Any]]:
    """The ``digests.json`` that :func:`write_detection_shards` wrote: ``where`` is its directory,
    one of its shard paths or the file itself."""
    path = where if where.endswith(".json") else os.path.join(
        where if os.path.isdir(where) else os.path.dirname(where), DIGESTS_FILE)
    with open(path) as f:
        return json.load(f)


def check_detection_sample(sample, digests: Optional[Dict[str, Dict[str, Any]]] = None, *, seed: int = 0,
                           max_objects: int = MAX_OBJECTS) -> str:
    """Raise AssertionError unless ``sample`` (``(key, image, target)``) has the content that its key
    must have: dtypes and shapes, then object count and the checksums of image, masks, boxes and
    labels. The expectation comes from ``digests[key]`` (:func:`load_digests`) or, without
    ``digests``, is recomputed by :func:`expected_detection` (``size`` from the image, ``seed`` and
    ``max_objects`` as given). Returns the key."""
    assert isinstance(sample, (tuple, list)) and len(sample) == 3, f"not a (key, image, target): {type(sample)}"
    key, image, target = sample
    assert isinstance(key, str), f"key {key!r} is not a str"
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 \
        and image.shape[0] == 3, f"sample {key}: image is {getattr(image, 'dtype', type(image))} " \
                                 f"{tuple(getattr(image, 'shape', ()))}, not uint8 [3, H, W]"
    n = objects(sample)
    assert 1 <= n <= max_objects, f"sample {key}: {n} objects, not 1..{max_objects}"
    assert target["boxes"].dtype == torch.float32 and tuple(target["boxes"].shape) == (n, 4), \
        f"sample {key}: boxes {target['boxes'].dtype} {tuple(target['boxes'].shape)}"
    assert target["labels"].dtype == torch.int64 and tuple(target["labels"].shape) == (n,), \
        f"sample {key}: labels {target['labels'].dtype} {tuple(target['labels'].shape)}"
    if "masks" in target:
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and tuple(masks.shape) == (n, image.shape[1], image.shape[2]), \
            f"sample {key}: masks {masks.dtype} {tuple(masks.shape)} for image {tuple(image.shape)}"
    if digests is not None:
        assert key in digests, f"sample {key}: no such key in the digests"
        want = digests[key]
    else:
        want = expected_detection(key, seed=seed, size=(int(image.shape[2]), int(image.shape[1])),
                                  max_objects=max_objects)
    got = detection_digest(sample)
    for field, value in got.items():
        if field == "masks_sha256" and value is None:
            continue  # decode_masks=False: the count and the boxes still identify the objects
        assert value == want[field], f"sample {key}: {field} is {value!r}, must be {want[field]!r}"
    return key


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets

def hf_length(i: int, seed: int = 0) -> int:
    """The length of row ``i``'s ``x`` in :func:`hf_stream`: 1..50, uneven."""
    return 1 + (i * 7 + seed) % 50


def hf_stream(n: int = 200, num_shards: int = 4, seed: int = 0):
    """An HF ``datasets.IterableDataset`` of ``n`` rows in ``num_shards`` shards (contiguous runs of
    ids), torch-formatted: each sample is ``{"id": int64 0-d tensor, "x": int64 [hf_length(id)]}``
    with every value of ``x`` equal to ``id``. Made as
    ``Dataset.from_dict(...).with_format("torch").to_iterable_dataset(num_shards=num_shards)``."""
    from datasets import Dataset

    ids = list(range(n))
    table = Dataset.from_dict({"id": ids, "x": [[i] * hf_length(i, seed) for i in ids]})
    return table.with_format("torch").to_iterable_dataset(num_shards=num_shards)


def check_hf_sample(sample: Dict[str, Any], seed: int = 0) -> int:
    """Raise AssertionError unless ``sample`` is row ``id`` of :func:`hf_stream`; return the id."""
    assert isinstance(sample, dict) and set(sample) == {"id", "x"}, f"not an hf_stream row: {sample!r}"
    ident, x = sample["id"], sample["x"]
    assert isinstance(ident, torch.Tensor) and ident.dim() == 0 and ident.dtype == torch.int64, f"id is {ident!r}"
    i = int(ident)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.int64 and tuple(x.shape) == (hf_length(i, seed),), \
        f"row {i}: x is {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}, " \
        f"must be int64 ({hf_length(i, seed)},)"
    assert bool((x == i).all()), f"row {i}: x holds values other than {i}"
    return i


# --------------------------------------------------------------------------------------------------
# plain generator streams

def counting_length(key: int, max_len: int = 97) -> int:
    """The length of key ``key``'s ``x`` in :class:`CountingStream`: 1..``max_len``, uneven."""
    return 1 + (key * 13) % max_len


def counting_keys(n: int, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> List[int]:
    """The keys, in order, that :class:`CountingStream` yields on that rank in that worker."""
    return list(range(n))[rank::world_size][worker::num_workers]


class CountingStream(IterableDataset):
    """Keys ``0..n-1``: this rank takes ``keys[rank::world_size]``, and in a DataLoader worker
    (``get_worker_info()``) worker ``w`` of ``W`` takes every W-th of those from the w-th, in
    ascending order (:func:`counting_keys`). Each sample is ``{"key": i, "x": int64
    [counting_length(i, max_len)]}`` with ``x = i * 1000 + arange(len)`` (so ``max_len`` must stay
    under 1000). Deterministic: every iteration yields the same samples in the same order.
    ``len(x)`` is a natural cost (:meth:`cost`)."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, max_len: int = 97) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if not 1 <= max_len < 1000:
            raise ValueError(f"max_len {max_len} is not in 1..999")
        self.n, self.rank, self.world_size, self.max_len = n, rank, world_size, max_len

    def keys(self) -> List[int]:
        """The keys this process yields, in order (its worker's share inside a worker)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return counting_keys(self.n, self.rank, self.world_size, worker, workers)

    def sample(self, key: int) -> Dict[str, Any]:
        return {"key": key, "x": key * 1000 + torch.arange(counting_length(key, self.max_len), dtype=torch.int64)}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for key in self.keys():
            yield self.sample(key)

    @staticmethod
    def cost(sample: Dict[str, Any]) -> int:
        return int(sample["x"].numel())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, rank={self.rank}, world_size={self.world_size})"


class UnseededStream(CountingStream):
    """:class:`CountingStream`'s samples (same keys per rank and worker, same content) in an order
    drawn from an unseeded RNG (``random.Random()``, seeded from the OS) at every iteration: a
    stream that is not deterministic, for the tests that must notice one."""

    def keys(self) -> List[int]:
        keys = super().keys()
        random.Random().shuffle(keys)
        return keys


def check_counting_sample(sample: Dict[str, Any], max_len: int = 97) -> int:
    """Raise AssertionError unless ``sample`` is what :class:`CountingStream` yields for its key;
    return the key."""
    assert isinstance(sample, dict) and set(sample) == {"key", "x"}, f"not a CountingStream sample: {sample!r}"
    key, x = sample["key"], sample["x"]
    assert isinstance(key, int), f"key {key!r} is not an int"
    length = counting_length(key, max_len)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.int64 and tuple(x.shape) == (length,), \
        f"sample {key}: x is {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}, " \
        f"must be int64 ({length},)"
    assert torch.equal(x, key * 1000 + torch.arange(length, dtype=torch.int64)), f"sample {key}: x differs"
    return key

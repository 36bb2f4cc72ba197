"""Synthetic datasets for the scenarios. Each sample carries its index and
fills its tensors with values derived from it, so the receiver can check both
which samples arrived and that their bytes arrived intact."""

from __future__ import annotations

import io
import os
import signal
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = ["SegmentationDataset", "CocoStyleDataset", "VolumeDataset", "GiantSampleDataset", "ManyTensorsDataset",
           "MixedDataset", "PoisonDataset", "OddTensorsDataset", "Tagged", "detection_collate", "list_collate",
           "kill_one_worker", "fill_shm"]


def detection_collate(batch: List[Any]) -> tuple:
    """The seed's collate: a tuple of per-field tuples."""
    return tuple(zip(*batch))


class SegmentationDataset(Dataset):
    """The seed's instance-segmentation workload, scaled: image ``i`` has
    ``costs[i]`` masks of ``side x side`` bytes each."""

    def __init__(self, costs: Sequence[int], side: int = 48) -> None:
        self.costs = np.asarray(costs)
        self.side = side

    def __len__(self) -> int:
        return len(self.costs)

    def __getitem__(self, i: int):
        n, s = int(self.costs[i]), self.side
        target = {
            "image_id": torch.tensor(i),
            "masks": torch.full((n, s, s), i % 251, dtype=torch.uint8),
            "boxes": torch.full((n, 4), float(i)),
            "labels": torch.full((n,), i, dtype=torch.int64),
            "area": torch.full((n,), float(i)),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }
        return torch.full((3, s, s), float(i)), target, i

    @staticmethod
    def check(batch) -> List[int]:
        images, targets, ids = batch
        for image, target, i in zip(images, targets, ids):
            assert int(target["image_id"]) == i and float(image.flatten()[0]) == i, f"sample {i} corrupted"
            assert target["masks"].numel() == 0 or int(target["masks"].flatten()[-1]) == i % 251
        return list(ids)


class CocoStyleDataset(Dataset):
    """A COCO-style instance-segmentation set made up in memory: JPEG bytes per image and, per
    object, a polygon; ``__getitem__`` decodes the JPEG and draws each polygon into a uint8 mask
    (PIL ``ImageDraw``), as a torchvision detection pipeline does. Call :meth:`prepare` once
    before the workers start (it encodes the JPEGs); image ``i`` has ``objects[i]`` masks."""

    def __init__(self, n: int, width: int = 320, height: int = 240, max_objects: int = 150, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.width, self.height, self.seed = width, height, seed
        self.objects = rng.integers(1, max_objects + 1, n)
        self._jpegs: List[bytes] = []

    def __len__(self) -> int:
        return len(self.objects)

    def prepare(self) -> "CocoStyleDataset":
        """Encode the images (a gradient stamped with the index, ~15 KB of JPEG each)."""
        from PIL import Image

        if self._jpegs:
            return self
        y, x = np.mgrid[0:self.height, 0:self.width]
        for i in range(len(self)):
            pixels = np.stack([(x + i) % 256, (y * 2 + i) % 256, np.full_like(x, i % 256)], axis=-1)
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=85)
            self._jpegs.append(buffer.getvalue())
        return self

    def polygons(self, i: int) -> List[List[float]]:
        """Object ``k`` of image ``i``: a random convex-ish polygon, as COCO's ``segmentation``."""
        rng = np.random.default_rng((self.seed, i))
        out = []
        for _ in range(int(self.objects[i])):
            cx, cy = rng.uniform(20, self.width - 20), rng.uniform(20, self.height - 20)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
            radii = rng.uniform(5, 40, 8)
            xs = np.clip(cx + radii * np.cos(angles), 0, self.width - 1)
            ys = np.clip(cy + radii * np.sin(angles), 0, self.height - 1)
            out.append(np.stack([xs, ys], axis=1).ravel().tolist())
        return out

    def __getitem__(self, i: int):
        from PIL import Image, ImageDraw

        if not self._jpegs:
            raise RuntimeError("CocoStyleDataset.prepare() was not called")
        image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(self._jpegs[i])).convert("RGB")).copy())
        masks, boxes = [], []
        for polygon in self.polygons(i):
            canvas = Image.new("L", (self.width, self.height), 0)
            ImageDraw.Draw(canvas).polygon(polygon, fill=1)
            masks.append(np.asarray(canvas))
            xs, ys = polygon[0::2], polygon[1::2]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
        n = len(masks)
        target = {
            "image_id": torch.tensor(i),
            "masks": torch.from_numpy(np.stack(masks)),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.full((n,), 1 + i % 80, dtype=torch.int64),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }
        return image.permute(2, 0, 1), target, i

    @staticmethod
    def check(batch) -> List[int]:
        images, targets, ids = batch
        for image, target, i in zip(images, targets, ids):
            assert int(target["image_id"]) == i and int(target["labels"][0]) == 1 + i % 80, f"sample {i} corrupted"
            assert target["masks"].dtype == torch.uint8 and int(target["masks"].sum()) > 0, \
                f"sample {i} corrupted: empty masks"
            assert tuple(image.shape) == (3, target["masks"].shape[1], target["masks"].shape[2]), \
                f"sample {i} corrupted: image {tuple(image.shape)}, masks {tuple(target['masks'].shape)}"
        return list(ids)

    def check_against_getitem(self, batch) -> List[int]:
        """:meth:`check`, then every tensor of every sample compared with ``self[i]`` made again here
        (dtype, shape and every value): the full content, not only the index."""
        ids = self.check(batch)
        images, targets, _ = batch
        for image, target, i in zip(images, targets, ids):
            want_image, want, _ = self[i]
            got = {"image": image, **{key: target[key] for key in want}}
            for key, expected in {"image": want_image, **want}.items():
                value = got[key]
                assert value.dtype == expected.dtype and value.shape == expected.shape, \
                    f"sample {i} corrupted: {key} is {value.dtype} {tuple(value.shape)}, __getitem__ makes " \
                    f"{expected.dtype} {tuple(expected.shape)}"
                assert torch.equal(value, expected), f"sample {i} corrupted: its {key} differ from __getitem__'s"
        return ids


class TorchvisionStyleDetection(CocoStyleDataset):
    """The COCO-style set through the training pipeline of torchvision's detection references
    (``references/detection``: ``ConvertCocoPolysToMask``, then ``DetectionPresetTrain("hflip")``): boxes
    clamped to the image with the degenerate ones dropped, ``area`` per object, the image as float32 in
    [0, 1] (``PILToTensor`` + ``ToDtype(torch.float, scale=True)``: 4x the bytes of the decoded JPEG), and
    ``RandomHorizontalFlip(0.5)`` of image, masks and boxes. The flip is drawn from the index, so that
    ``__getitem__`` makes the same sample every time (the checks make it again)."""

    def __getitem__(self, i: int):
        image, target, index = super().__getitem__(i)
        boxes = target["boxes"]
        boxes[:, 0::2].clamp_(0, self.width)
        boxes[:, 1::2].clamp_(0, self.height)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {key: (value[keep] if value.dim() else value) for key, value in target.items()}
        target["area"] = (target["boxes"][:, 3] - target["boxes"][:, 1]) * (target["boxes"][:, 2] - target["boxes"][:, 0])
        image = image.to(torch.float32) / 255
        if np.random.default_rng((self.seed, i, 1)).random() < 0.5:
            image = image.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = self.width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return image, target, index


class CocoStream(IterableDataset):
    """:class:`CocoStyleDataset` as a stream read from shards (contiguous runs of images), each
    DataLoader worker reading every ``num_workers``-th shard, as WebDataset's ``split_by_worker``
    does: the same samples, and the same :meth:`check`, with no indices to plan over."""

    def __init__(self, n: int, shards: int = 8) -> None:
        self.images = CocoStyleDataset(n)
        self.samples = n
        self.bounds = np.linspace(0, n, shards + 1).round().astype(int)

    def prepare(self) -> "CocoStream":
        self.images.prepare()
        return self

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in range(worker, len(self.bounds) - 1, workers):
            for i in range(self.bounds[shard], self.bounds[shard + 1]):
                yield self.images[i]

    def objects(self, sample) -> int:
        """A sample's cost: its masks."""
        return int(sample[1]["masks"].shape[0])

    check = staticmethod(CocoStyleDataset.check)

    def check_against_getitem(self, batch) -> List[int]:
        """Every tensor of every sample compared with the image made again here (see CocoStyleDataset)."""
        return self.images.check_against_getitem(batch)


class VolumeDataset(Dataset):
    """3-D volumes of one shape (default collate stacks them)."""

    def __init__(self, n: int, shape=(1, 64, 64, 64)) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"volume": torch.full(self.shape, float(i)), "index": i}

    @staticmethod
    def check(batch) -> List[int]:
        ids = batch["index"].tolist()
        firsts = batch["volume"].flatten(1)[:, 0].tolist()
        assert firsts == [float(i) for i in ids], "volume corrupted"
        return ids


class GiantSampleDataset(Dataset):
    """``n`` samples of ``small_bytes``, and sample ``giant_index`` of ``giant_bytes``."""

    def __init__(self, n: int, small_bytes: int, giant_bytes: int, giant_index: int) -> None:
        self.n, self.small, self.giant, self.giant_index = n, small_bytes, giant_bytes, giant_index

    def __len__(self) -> int:
        return self.n

    def sizes(self) -> np.ndarray:
        sizes = np.full(self.n, self.small)
        sizes[self.giant_index] = self.giant
        return sizes

    def __getitem__(self, i: int):
        nbytes = self.giant if i == self.giant_index else self.small
        return torch.full((nbytes // 4,), float(i)), i

    @staticmethod
    def check(batch) -> List[int]:
        ids = batch[1] if isinstance(batch[1], list) else batch[1].tolist()
        for data, i in zip(batch[0], ids):
            assert float(data[0]) == i and float(data[-1]) == i, f"sample {i} corrupted"
        return ids


class ManyTensorsDataset(Dataset):
    """Each sample is ``tensors`` small tensors; default collate stacks each field
    into its own shm file, so a batch brings that many fds to the main process."""

    def __init__(self, n: int, tensors: int = 300, numel: int = 64) -> None:
        self.n, self.tensors, self.numel = n, tensors, numel

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        sample = {f"part{k:03d}": torch.full((self.numel,), float(i)) for k in range(self.tensors)}
        sample["index"] = i
        return sample

    @staticmethod
    def check(batch) -> List[int]:
        ids = batch["index"].tolist()
        for key, value in batch.items():
            if key != "index":
                assert value[:, 0].tolist() == [float(i) for i in ids], f"{key} corrupted"
        return ids


class MixedDataset(Dataset):
    """Nested dicts and lists of numpy arrays, strings and tensors of several dtypes."""

    def __init__(self, n: int, big_numel: int = 1 << 18) -> None:
        self.n, self.big_numel = n, big_numel

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {
            "index": i,
            "name": f"sample-{i}",
            "pixels": torch.full((self.big_numel,), i % 100, dtype=torch.bfloat16),
            "meta": {"mask": torch.tensor([i % 2 == 0] * 8), "small": torch.full((4,), i, dtype=torch.int8),
                     "exact": np.full(16, i, dtype=np.float64)},
            "parts": [torch.full((3,), i, dtype=torch.int32), torch.full((2, 2), complex(i, -i))],
        }

    @staticmethod
    def check(batch) -> List[int]:
        ids = batch["index"].tolist()
        for row, i in enumerate(ids):
            assert batch["name"][row] == f"sample-{i}"
            assert float(batch["pixels"][row, -1]) == i % 100 and batch["pixels"].dtype == torch.bfloat16
            assert bool(batch["meta"]["mask"][row, 0]) == (i % 2 == 0)
            assert int(batch["meta"]["small"][row, 0]) == np.int8(i)
            assert float(batch["meta"]["exact"][row, 3]) == i
            assert int(batch["parts"][0][row, 2]) == i and batch["parts"][1][row, 1, 1] == complex(i, -i)
        return ids


def list_collate(batch: List[Any]) -> List[Any]:
    """The batch as the list of its samples (what vanilla needs for sparse and nested tensors)."""
    return list(batch)


class PoisonDataset(VolumeDataset):
    """Volumes whose sample ``poison`` kills the worker loading it (``os._exit(1)``) the first time
    only: a marker file in ``marker_dir`` (set before the workers start) remembers it was loaded."""

    def __init__(self, n: int, shape=(1, 16, 16, 16), poison: int = 9) -> None:
        super().__init__(n, shape)
        self.poison = poison
        self.marker_dir: str = ""

    def __getitem__(self, i: int):
        if i == self.poison and self.marker_dir:
            marker = os.path.join(self.marker_dir, "poisoned")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().__getitem__(i)


class Tagged(torch.Tensor):
    """A tensor subclass with an extra attribute, as torchvision's tv_tensors are."""

    tag: str = ""  # set on the instance: torch pickles a subclass's __dict__ with it


def _make_tagged(data: torch.Tensor, tag: str) -> Tagged:
    out = data.as_subclass(Tagged)
    out.tag = tag
    return out


#: dtypes that need care on every road (limited-support unsigned ints, float8, complex32, bf16); those
#: this torch lacks are left out (uint16/32/64 came in 2.3, float8 in 2.1)
ODD_DTYPES = [d for d in (getattr(torch, name, None) for name in (
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "complex32", "bfloat16")) if d is not None]


class OddTensorsDataset(Dataset):
    """Sparse COO and CSR, a nested tensor, a :class:`Tagged` subclass and :data:`ODD_DTYPES`, with
    values from the index; sample ``giant`` also carries ``giant_bytes`` of padding (so its batch
    cannot fit in /dev/shm)."""

    def __init__(self, n: int, giant: int = -1, giant_bytes: int = 0, pad_bytes: int = 0) -> None:
        self.n, self.giant, self.giant_bytes, self.pad_bytes = n, giant, giant_bytes, pad_bytes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        v = i % 8  # exact in every dtype here, float8 included
        dense = torch.zeros(4, 5)
        dense[i % 4, i % 5] = v + 1
        dense[(i + 1) % 4, 0] = 2 * v + 1
        nested = torch.nested.nested_tensor([torch.full((2, 3), float(v)), torch.full((1 + i % 3, 3), -float(v))])
        tagged = _make_tagged(torch.full((3,), float(i)), f"tag-{i}")
        nbytes = self.giant_bytes if i == self.giant else self.pad_bytes
        return {"index": i, "coo": dense.to_sparse(), "csr": dense.to_sparse_csr(), "nested": nested,
                "tagged": tagged, "pad": torch.full((max(1, nbytes),), i % 251, dtype=torch.uint8),
                "dtypes": [torch.full((2, 2), v, dtype=torch.float32).to(d) for d in ODD_DTYPES]}

    @staticmethod
    def expected_dense(i: int) -> torch.Tensor:
        v = i % 8
        dense = torch.zeros(4, 5)
        dense[i % 4, i % 5] = v + 1
        dense[(i + 1) % 4, 0] = 2 * v + 1
        return dense

    @classmethod
    def check(cls, batch) -> List[int]:
        assert isinstance(batch, list), f"a list collate gave {type(batch).__name__}"
        ids = []
        for sample in batch:
            i = sample["index"]
            v = i % 8
            ids.append(i)
            coo, csr, nested, tagged = sample["coo"], sample["csr"], sample["nested"], sample["tagged"]
            assert coo.layout == torch.sparse_coo, f"sample {i}: coo arrived as {coo.layout}"
            assert csr.layout == torch.sparse_csr, f"sample {i}: csr arrived as {csr.layout}"
            assert torch.equal(coo.to_dense(), cls.expected_dense(i)), f"sample {i}: coo values differ"
            assert torch.equal(csr.to_dense(), cls.expected_dense(i)), f"sample {i}: csr values differ"
            assert nested.is_nested, f"sample {i}: the nested tensor arrived as a plain one"
            parts = nested.unbind()
            assert [tuple(p.shape) for p in parts] == [(2, 3), (1 + i % 3, 3)], f"sample {i}: nested shapes differ"
            assert bool((parts[0] == v).all()) and bool((parts[1] == -v).all()), f"sample {i}: nested values"
            assert type(tagged) is Tagged, f"sample {i}: the subclass arrived as {type(tagged).__name__}"
            assert tagged.tag == f"tag-{i}" and bool((tagged == i).all()), f"sample {i}: subclass tag or values"
            assert int(sample["pad"][-1]) == i % 251, f"sample {i}: padding corrupted"
            got = sample["dtypes"]
            assert [t.dtype for t in got] == ODD_DTYPES, f"sample {i}: dtypes {[t.dtype for t in got]}"
            for t in got:
                assert bool((t.to(torch.float32 if not t.is_complex() else torch.complex64) == v).all()), \
                    f"sample {i}: {t.dtype} values differ"
        return ids


def fill_shm(name: str = "stress-fill", path: str = "/dev/shm") -> int:
    """Fill the tmpfs at ``path`` to the last page with one file; its size in bytes."""
    fd = os.open(os.path.join(path, name), os.O_CREAT | os.O_RDWR, 0o600)
    size, step = 0, 1 << 20
    try:
        while step >= 4096:
            try:
                os.posix_fallocate(fd, size, step)
                size += step
            except OSError:
                step //= 2
    finally:
        os.close(fd)
    return size


def kill_one_worker() -> int:
    """SIGKILL one DataLoader worker of this process; returns its pid."""
    from adaptive_loader import _torch

    pids = _torch.dataloader_worker_pids()  # torch < 2.5 does not name its workers pt_data_worker
    if not pids:
        raise RuntimeError("no worker process to kill")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]

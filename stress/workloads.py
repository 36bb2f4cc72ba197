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
from torch.utils.data import Dataset

__all__ = ["SegmentationDataset", "CocoStyleDataset", "VolumeDataset", "GiantSampleDataset", "ManyTensorsDataset",
           "MixedDataset", "detection_collate", "kill_one_worker"]


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
            assert target["masks"].dtype == torch.uint8 and int(target["masks"].sum()) > 0, f"sample {i}: empty masks"
            assert tuple(image.shape) == (3, target["masks"].shape[1], target["masks"].shape[2])
        return list(ids)


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


def kill_one_worker() -> int:
    """SIGKILL one DataLoader worker of this process; returns its pid."""
    import psutil

    children = [c for c in psutil.Process().children() if c.name() == "pt_data_worker"]  # torch names them
    if not children:
        raise RuntimeError("no worker process to kill")
    victim = children[0]
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid

"""A COCO-style detection set read as a WebDataset stream, batched by objects with AdaptiveLoader.

The example writes a few WebDataset tar shards to a temporary directory (one ``.jpg`` and one
COCO-style ``.json`` per image, 1 to 150 polygons each), then reads them the way a training job
does: ``wds.WebDataset`` with ``split_by_node`` and ``split_by_worker``, decoded with PIL, each
sample turned into ``(key, image, target)`` with one uint8 mask per polygon. AdaptiveLoader's
workers pack each worker's samples into batches of at most ``--max-cost`` objects and 8 images
(docs/streams.md says how)::

    python examples/webdataset_detection.py
    python examples/webdataset_detection.py --images 128 --max-cost 300 --epochs 3

It prints one line per epoch and exits with status 1 unless every image came exactly once in
every epoch. It needs ``webdataset`` and Pillow (both in the dev extra).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

try:
    import webdataset as wds
    from PIL import Image, ImageDraw
except ImportError as exc:
    sys.exit(f"this example needs webdataset and Pillow ({exc}): pip install webdataset Pillow, "
             f"or pip install -e '.[dev]'")

from adaptive_loader import AdaptiveLoader

MAX_OBJECTS = 150


def write_shards(directory: str, images: int, shards: int, size=(160, 120), seed: int = 0) -> list:
    """``images`` samples in ``shards`` tar files, keys ``000000``, ``000001``, ... in order."""
    width, height = size
    paths = []
    bounds = np.linspace(0, images, shards + 1).round().astype(int)
    for s in range(shards):
        path = os.path.join(directory, f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(bounds[s], bounds[s + 1]):
                rng = np.random.default_rng((seed, i))
                n = 1 + int((MAX_OBJECTS - 1) * rng.random() ** 3)  # uneven, as in COCO: many small counts
                annotations = []
                for _ in range(n):
                    cx, cy = rng.uniform(10, width - 10), rng.uniform(10, height - 10)
                    angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
                    radii = rng.uniform(2, 20, 6)
                    xs = np.clip(cx + radii * np.cos(angles), 0, width - 1).round(1)
                    ys = np.clip(cy + radii * np.sin(angles), 0, height - 1).round(1)
                    annotations.append({"segmentation": [np.stack([xs, ys], 1).ravel().tolist()],
                                        "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs)),
                                                 float(np.ptp(ys))],
                                        "category_id": int(rng.integers(1, 81))})
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(pixels).save(jpeg, format="JPEG", quality=85)
                record = {"image_id": i, "width": width, "height": height, "annotations": annotations}
                sink.write({"__key__": f"{i:06d}", "jpg": jpeg.getvalue(), "json": json.dumps(record).encode()})
        paths.append(path)
    return paths


def to_sample(fields):
    """``(key, PIL image, COCO record)`` -> ``(key, image uint8 [3, H, W], target)``, masks drawn here."""
    key, picture, record = fields
    image = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)
    height, width = image.shape[1:]
    masks = np.zeros((len(record["annotations"]), height, width), dtype=np.uint8)
    for k, annotation in enumerate(record["annotations"]):
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon(annotation["segmentation"][0], fill=1)
        masks[k] = np.asarray(canvas)
    boxes = torch.tensor([a["bbox"] for a in record["annotations"]], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # COCO's x, y, w, h -> x0, y0, x1, y1
    target = {"image_id": int(record["image_id"]), "boxes": boxes, "masks": torch.from_numpy(masks),
              "labels": torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.int64)}
    return key, image, target


def objects_per_image(sample) -> int:
    """The cost of a sample: its objects (one mask each)."""
    return len(sample[2]["labels"])


def collate(batch):
    """The detection collate: (keys, images, targets), nothing stacked. Module-level, so it pickles."""
    return tuple(zip(*batch))


def pipeline(urls):
    # The key comes first in each tuple: the loader uses it to check that a stream read again after a
    # worker's death is the same stream. Keep the order deterministic (here no shuffle; a shuffle needs
    # a seed) so that a worker started again can skip exactly what was delivered.
    return (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                           workersplitter=wds.split_by_worker)
            .decode("pil").to_tuple("__key__", "jpg", "json").map(to_sample))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shards", type=int, default=4, help="at least --workers: WebDataset splits whole shards")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-cost", type=float, default=200, help="cap on the objects in one batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=None, help="where the shards go (default: a temporary directory, removed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    directory = args.data or tempfile.mkdtemp(prefix="wds-detection-")
    try:
        os.makedirs(directory, exist_ok=True)
        urls = write_shards(directory, args.images, args.shards)
        print(f"wrote {args.images} images in {args.shards} shards to {directory}", flush=True)
        loader = AdaptiveLoader(pipeline(urls), costs=objects_per_image, max_cost=args.max_cost, max_batch_size=8,
                                num_workers=args.workers, collate_fn=collate)
        try:
            return run(args, loader)
        finally:
            loader.close()
    finally:
        if args.data is None:
            shutil.rmtree(directory, ignore_errors=True)


def run(args: argparse.Namespace, loader: AdaptiveLoader) -> int:
    expected = {f"{i:06d}" for i in range(args.images)}
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        started = time.monotonic()
        seen, batches, objects = [], 0, 0
        for keys, images, targets in loader:
            cost = sum(len(t["labels"]) for t in targets)
            assert len(keys) <= 8 and (cost <= args.max_cost or len(keys) == 1), (len(keys), cost)
            seen.extend(keys)
            batches += 1
            objects += cost
        once = len(seen) == len(set(seen)) and set(seen) == expected
        print(f"epoch {epoch}: {batches} batches, {len(seen)} images, {objects} objects, max_cost "
              f"{loader.max_cost:g}, fallbacks {loader.fallbacks}, every image once: {'yes' if once else 'NO'} "
              f"({time.monotonic() - started:.1f} s)", flush=True)
        if not once:
            print(f"epoch {epoch}: {len(expected - set(seen))} images missing, {len(seen) - len(set(seen))} "
                  f"delivered twice", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

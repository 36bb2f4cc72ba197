"""A Mask R-CNN-style training loop with AdaptiveLoader, on synthetic data (torch only).

The data is described the way COCO describes it: an instances annotation dict (``images`` with
their width and height, ``annotations`` with a box each) that the example makes up. Each image
has 10 to 1,200 instances and one of three shapes (wide, square, tall); its target is a dict of
``boxes``, ``labels`` and ``masks`` as torchvision's detection models take them, and the collate
is the usual ``tuple(zip(*batch))``. From the annotations alone:

- ``coco_costs`` counts the objects of each image: the cost, so a batch is capped by the objects
  it holds (``--max-cost``) as well as by images (``--max-batch-size``), and AdaptiveLoader
  lowers that cap when /dev/shm gets tight. (With a real dataset:
  ``coco_costs("annotations/instances_train2017.json", return_sizes=True)``.)
- ``aspect_ratio_groups`` bins the image sizes as torchvision's detection reference does, and
  ``group_ids=`` keeps every batch within one bin, so the images of a batch stack without padding.
- ``--cost padded`` is for a collate that pads each sample to the largest of its batch: a batch
  then counts ``len(batch) * max(objects)`` instead of the sum.

The model is deliberately tiny (a few convolutions predicting a foreground mask and the object
count); what the example shows is the loop around it::

    python examples/maskrcnn_style_training.py --epochs 2
    python examples/maskrcnn_style_training.py --epochs 2 --telemetry run.jsonl   # then: adaptive-loader report run.jsonl
    python examples/maskrcnn_style_training.py --epochs 3 --stop-after 5          # "crashes" after 5 batches...
    python examples/maskrcnn_style_training.py --epochs 3 --resume                # ...and finishes the run

A checkpoint (model, optimizer, epoch, ``loader.state_dict()`` and the images seen so far in the
epoch) is written in the middle and at the end of every epoch. ``--resume`` loads it and delivers
exactly the images of that epoch not yet trained on; the summary line checks every image came once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from adaptive_loader import AdaptiveLoader
from adaptive_loader.costs import aspect_ratio_groups, coco_costs


def make_coco_annotations(n_images: int, side: int = 32, num_classes: int = 5, seed: int = 0) -> dict:
    """A COCO-style instances dict: images of three shapes, 10 to 1,200 boxes each."""
    rng = np.random.default_rng(seed)
    shapes = [(side * 3 // 2, side), (side, side), (side, side * 3 // 2)]  # (width, height): 1.5, 1, 0.67
    images, annotations = [], []
    for image_id in range(1, n_images + 1):  # COCO ids start at 1; the list order is the dataset order
        width, height = shapes[rng.integers(len(shapes))]
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height})
        n = int(rng.integers(10, 1201))
        x0, y0 = rng.integers(width, size=n), rng.integers(height, size=n)
        w, h = rng.integers(1, width - x0 + 1), rng.integers(1, height - y0 + 1)
        labels = rng.integers(1, num_classes, size=n)
        for box in zip(x0.tolist(), y0.tolist(), w.tolist(), h.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": list(box[:4]),
                                "category_id": box[4], "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_classes)]}


class SyntheticInstances(Dataset):
    """Index ``i`` is the ``i``-th image of a COCO-style dict: its boxes, labels and box-shaped masks.

    The pixels are drawn from ``(seed, i)``, so a worker produces the same sample every time.
    """

    def __init__(self, coco: dict, seed: int = 0) -> None:
        self.sizes = [(im["width"], im["height"]) for im in coco["images"]]
        row = {im["id"]: i for i, im in enumerate(coco["images"])}
        per_image = [[] for _ in coco["images"]]
        for ann in coco["annotations"]:
            per_image[row[ann["image_id"]]].append([*ann["bbox"], ann["category_id"]])
        self.objects = [np.array(rows, np.int64).reshape(-1, 5) for rows in per_image]  # x, y, w, h, class
        self.seed = seed

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, i: int):
        width, height = self.sizes[i]
        objects = torch.from_numpy(self.objects[i])
        lo, hi = objects[:, 0:2], objects[:, 0:2] + objects[:, 2:4]  # (n, 2) as (x, y)
        ys = torch.arange(height).view(1, height, 1)
        xs = torch.arange(width).view(1, 1, width)
        masks = ((ys >= lo[:, 1, None, None]) & (ys < hi[:, 1, None, None])
                 & (xs >= lo[:, 0, None, None]) & (xs < hi[:, 0, None, None])).to(torch.uint8)
        coverage = masks.sum(0, dtype=torch.float32)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = torch.stack([coverage / coverage.max().clamp(min=1), (coverage > 0).float(),
                             torch.rand(height, width, generator=g)])
        target = {
            "boxes": torch.cat([lo, hi], dim=1).float(),  # x0, y0, x1, y1
            "labels": objects[:, 4],
            "masks": masks,
            "image_id": i,
        }
        return image, target


def collate(batch):
    """The detection collate: a tuple of images and a tuple of target dicts, nothing stacked."""
    return tuple(zip(*batch))


class TinyMaskNet(torch.nn.Module):
    """Per-pixel foreground logits and, per image, log(1 + objects) / log(1201)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
        )
        self.mask_head = torch.nn.Conv2d(width, 1, 1)
        self.count_head = torch.nn.Linear(width, 1)

    def forward(self, images: torch.Tensor):
        features = self.body(images)
        return self.mask_head(features).squeeze(1), self.count_head(features.mean(dim=(2, 3))).squeeze(1)


def loss_fn(model: TinyMaskNet, images, targets) -> torch.Tensor:
    images = torch.stack(images)  # one shape per batch: the aspect-ratio groups see to it
    foreground = torch.stack([(t["masks"].sum(0) > 0).float() for t in targets])
    log_count = torch.tensor([math.log1p(len(t["labels"])) / math.log(1201) for t in targets])  # in (0, 1]
    mask_logits, count = model(images)
    return F.binary_cross_entropy_with_logits(mask_logits, foreground) + F.mse_loss(count, log_count)


def new_progress(n: int) -> dict:
    """What one epoch has done so far; it goes into the checkpoint with the loader's state."""
    return {"seen": torch.zeros(n, dtype=torch.bool), "losses": [], "batches": 0, "objects": 0}


def save_checkpoint(path: str, **state) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing leaves the previous checkpoint intact


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=96, help="images in the synthetic dataset")
    p.add_argument("--side", type=int, default=32, help="short image side in pixels (the long one is 1.5x)")
    p.add_argument("--max-cost", type=float, default=2000, help="cap on the objects in one batch")
    p.add_argument("--max-batch-size", type=int, default=8, help="cap on the images in one batch")
    p.add_argument("--cost", choices=["sum", "padded"], default="sum",
                   help="sum: a batch counts its objects (this collate keeps images apart); padded: "
                        "len(batch) * max(objects), for a collate that pads to the largest")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--telemetry", default=None, help="JSONL file for the loader's telemetry records")
    p.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "maskrcnn_style_checkpoint.pt"),
                   help="where the mid-epoch and end-of-epoch checkpoints go")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="save a checkpoint and exit after N batches (simulates an interrupted run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    coco = make_coco_annotations(args.images, side=args.side, seed=args.seed)
    dataset = SyntheticInstances(coco, seed=args.seed)
    objects, sizes = coco_costs(coco, return_sizes=True)  # the costs: objects per image, in dataset order
    groups = aspect_ratio_groups(sizes)  # torchvision's bins (k=3); here three shapes, three groups
    loader = AdaptiveLoader(dataset, costs=objects, group_ids=groups, cost=args.cost, max_cost=args.max_cost,
                            max_batch_size=args.max_batch_size, num_workers=args.workers, collate_fn=collate,
                            shuffle=True, seed=args.seed, telemetry=args.telemetry,
                            persistent_workers=args.workers > 0)
    try:
        return train(args, dataset, loader)
    finally:
        loader.close()  # persistent workers, the telemetry file


def train(args: argparse.Namespace, dataset: SyntheticInstances, loader: AdaptiveLoader) -> int:
    model = TinyMaskNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    start_epoch, progress = 0, new_progress(len(dataset))
    if args.resume:
        state = torch.load(args.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])  # the next iteration delivers the rest of that epoch
        start_epoch, progress = state["epoch"], state["progress"]
        print(f"resumed from {args.checkpoint}: epoch {start_epoch}, "
              f"{int(progress['seen'].sum())} images already trained on")

    def checkpoint(epoch: int) -> None:
        save_checkpoint(args.checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        loader=loader.state_dict(), epoch=epoch, progress=progress)

    batches_done = 0
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # the same epoch after a resume: the loader continues it
        started = time.monotonic()
        seen = progress["seen"]
        half = max(1, len(loader) // 2)  # len(): batches still to come this epoch at the current budget
        for step, (images, targets) in enumerate(loader, start=1):
            loss = loss_fn(model, images, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for t in targets:
                if seen[t["image_id"]]:
                    raise RuntimeError(f"image {t['image_id']} delivered twice in epoch {epoch}")
                seen[t["image_id"]] = True
            progress["losses"].append(loss.item())
            progress["batches"] += 1
            progress["objects"] += sum(len(t["labels"]) for t in targets)
            batches_done += 1
            stop = args.stop_after is not None and batches_done >= args.stop_after
            if step == half or stop:
                checkpoint(epoch)  # mid-epoch: loader.state_dict() counts exactly the batches trained on
            if stop:
                print(f"stopped after {batches_done} batches in epoch {epoch} ({int(seen.sum())} of "
                      f"{len(dataset)} images); checkpoint {args.checkpoint}: continue with --resume")
                return 0
        missing = (~seen).nonzero().flatten()
        if len(missing):
            raise RuntimeError(f"epoch {epoch}: {len(missing)} images never delivered, e.g. {missing[:5].tolist()}")
        print(f"epoch {epoch}: {progress['batches']} batches, {int(seen.sum())} images, {progress['objects']} "
              f"objects, mean loss {np.mean(progress['losses']):.4f}, max_cost {loader.max_cost:g}, "
              f"fallbacks {loader.fallbacks}, every image once: yes ({time.monotonic() - started:.1f} s)",
              flush=True)
        progress = new_progress(len(dataset))
        checkpoint(epoch + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""BudgetBatchSampler through a real multi-worker DataLoader, on the seed's workload shape."""

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from adaptive_loader import BudgetBatchSampler
from stress.workloads import SegmentationDataset, detection_collate


def test_batch_sampler_through_dataloader_with_two_workers():
    costs = np.random.default_rng(0).integers(10, 1201, 300)
    sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, seed=1)
    loader = DataLoader(SegmentationDataset(costs, side=4), batch_sampler=sampler, num_workers=2,
                        collate_fn=detection_collate)
    seen = []
    n_batches = 0
    for batch in loader:
        images, targets, ids = batch
        n_batches += 1
        assert sum(t["masks"].shape[0] for t in targets) <= 1500 and len(images) <= 10
        seen += SegmentationDataset.check(batch)
    assert sorted(seen) == list(range(len(costs)))
    assert n_batches == len(sampler) == len(loader)
    assert n_batches < 300 / 2  # real batches, not the seed's batches of one


class ShapedSegmentation(SegmentationDataset):
    """SegmentationDataset whose image ``i`` is ``sides[i]`` pixels square."""

    def __init__(self, costs, sides):
        super().__init__(costs, side=int(max(sides)))
        self.sides = sides

    def __getitem__(self, i):
        image, target, index = super().__getitem__(i)
        return image[:, : self.sides[i], : self.sides[i]], target, index


def padded_collate(batch):
    """Stack the images (one shape per batch or it raises) and pad the labels to the longest."""
    images, targets, ids = detection_collate(batch)
    longest = max(len(t["labels"]) for t in targets)
    labels = torch.stack([F.pad(t["labels"], (0, longest - len(t["labels"])), value=-1) for t in targets])
    return torch.stack(images), labels, ids


def test_groups_and_padded_costs_through_dataloader_with_two_workers():
    """No batch mixes groups (image sides here), or torch.stack would raise; the padded cost the
    collate pays is the one the sampler budgeted."""
    rng = np.random.default_rng(2)
    costs = rng.integers(10, 1201, 200)
    groups = rng.integers(0, 3, 200)
    sampler = BudgetBatchSampler(costs, max_cost=3000, max_batch_size=10, seed=2, group_ids=groups, cost="padded")
    loader = DataLoader(ShapedSegmentation(costs, np.array([4, 6, 8])[groups]), batch_sampler=sampler,
                        num_workers=2, collate_fn=padded_collate)
    seen = []
    for images, labels, ids in loader:
        assert labels.numel() == sampler.batch_cost(list(ids))
        assert labels.numel() <= 3000 or len(ids) == 1
        seen += list(ids)
    assert sorted(seen) == list(range(200))
    assert len(sampler) < 200 / 3  # real batches, of 3.8 samples on average here

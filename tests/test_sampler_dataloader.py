"""BudgetBatchSampler through a real multi-worker DataLoader, on the seed's workload shape."""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from adaptive_loader import BudgetBatchSampler


class ObjectsDataset(Dataset):
    """Like the seed's: sample i has costs[i] objects (small masks here)."""

    def __init__(self, costs):
        self.costs = costs

    def __len__(self):
        return len(self.costs)

    def __getitem__(self, i):
        n = int(self.costs[i])
        return torch.zeros(3, 4, 4), {"masks": torch.zeros(n, 4, 4, dtype=torch.uint8), "image_id": i}


def detection_collate(batch):
    return tuple(zip(*batch))


def test_batch_sampler_through_dataloader_with_two_workers():
    costs = np.random.default_rng(0).integers(10, 1201, 300)
    sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, seed=1)
    loader = DataLoader(ObjectsDataset(costs), batch_sampler=sampler, num_workers=2, collate_fn=detection_collate)
    seen = []
    n_batches = 0
    for images, targets in loader:
        n_batches += 1
        objects = sum(t["masks"].shape[0] for t in targets)
        assert objects <= 1500 and len(images) <= 10
        seen += [t["image_id"] for t in targets]
    assert sorted(seen) == list(range(len(costs)))
    assert n_batches == len(sampler) == len(loader)
    assert n_batches < 300 / 2  # real batches, not the seed's batches of one

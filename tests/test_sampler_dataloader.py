"""BudgetBatchSampler through a real multi-worker DataLoader, on the seed's workload shape."""

import numpy as np
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

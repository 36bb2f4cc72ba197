"""adaptive_loader: batches under a cost budget, and a DataLoader that never runs out of shm."""

from .sampler import BudgetBatchSampler

__all__ = ["BudgetBatchSampler"]
__version__ = "0.1.0"

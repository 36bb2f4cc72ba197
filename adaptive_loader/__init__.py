"""adaptive_loader: batches under a cost budget, and a DataLoader that never runs out of shm."""

from .loader import AdaptiveLoader, LoaderFailed, LoaderStalled
from .sampler import BudgetBatchSampler

__all__ = ["AdaptiveLoader", "BudgetBatchSampler", "LoaderFailed", "LoaderStalled"]
__version__ = "0.1.0"

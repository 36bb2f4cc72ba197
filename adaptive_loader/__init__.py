"""adaptive_loader: batches under a cost budget, and a DataLoader that never runs out of shm."""

from .costs import aspect_ratio_groups, coco_costs
from .loader import AdaptiveLoader, LoaderFailed, LoaderStalled
from .sampler import BudgetBatchSampler
from .stream import StreamNotDeterministic
from .stream_loader import StreamLoader  # registers itself: AdaptiveLoader(stream) makes one

__all__ = ["AdaptiveLoader", "BudgetBatchSampler", "LoaderFailed", "LoaderStalled", "StreamLoader",
           "StreamNotDeterministic", "aspect_ratio_groups", "coco_costs"]
__version__ = "0.1.0"

"""``LightningLoader``: an AdaptiveLoader as Lightning's ``Trainer.fit`` should see it.

Lightning reads ``len(loader)`` once and ends every epoch after that many batches; an
AdaptiveLoader's length moves with its budget, so a plain loader could lose the end of an
epoch. This wrapper has no length (Lightning then runs each epoch until the loader ends it),
sends Lightning's ``sampler.set_epoch`` to the loader, and answers ``state_dict()`` with the
state from before the batch Lightning fetched ahead. No import of Lightning is needed.
See docs/integrations.md.
"""

from __future__ import annotations

import types
from typing import Any, Dict, Iterator, Optional

from .loader import AdaptiveLoader

__all__ = ["LightningLoader"]


class LightningLoader:
    """Wrap an :class:`AdaptiveLoader` for ``Trainer.fit(train_dataloaders=...)``."""

    def __init__(self, loader: AdaptiveLoader) -> None:
        self.loader = loader
        # Lightning calls sampler.set_epoch(epoch) at every epoch start: it goes to the loader's set_epoch
        self.sampler = types.SimpleNamespace(set_epoch=loader.set_epoch)
        self._state: Optional[Dict[str, Any]] = None

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            self._state = self.loader.state_dict()  # what was delivered before this fetch
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """The loader's state without the batch Lightning fetched ahead of the one it trains on."""
        return self._state if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._state = None

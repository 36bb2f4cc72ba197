"""AdaptiveLoader under Lightning's Trainer and accelerate's Accelerator, with the real libraries.

What each library does with an AdaptiveLoader (read in their sources, pinned here) is written up in
docs/integrations.md. In short:

- Lightning (2.6) takes any iterable as ``train_dataloaders``. It does not wrap it or add a sampler
  (``_prepare_dataloader`` returns non-DataLoaders as they are). At every epoch start it calls
  ``loader.sampler.set_epoch(epoch)`` (``lightning.fabric.utilities.data._set_sampler_epoch``), which
  AdaptiveLoader counts as choosing the epoch. It stores ``loader.state_dict()`` in its checkpoints and
  loads it on resume. It reads ``len(loader)`` once and ends every epoch after that many batches;
  ``adaptive_loader.lightning.LightningLoader`` avoids this.
- accelerate (1.x) ``prepare`` hands back anything that is not a ``torch.utils.data.DataLoader``
  unchanged (``Accelerator._prepare_one``). ``register_for_checkpointing`` puts it in
  ``save_state``/``load_state``.

Tests marked xfail(strict=True) state what a user would expect and fail now for the reason given; when
AdaptiveLoader changes so that they pass, drop the marker and update docs/integrations.md.
"""

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from adaptive_loader import AdaptiveLoader, BudgetBatchSampler
from adaptive_loader.lightning import LightningLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COSTS = np.random.default_rng(0).integers(10, 1201, 48)  # objects per image, as in the seed's question
MAX_COST, MAX_BATCH = 1500, 6
# more samples than the planning window: the shuffled packing, and so len(), changes from epoch to epoch
LONG_COSTS = np.random.default_rng(0).integers(10, 1201, 200)
LONG = dict(costs=LONG_COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH, shuffle=True, seed=0, window=16)


class Images(Dataset):
    """Sample ``i``: an "image" whose pixels are ``i`` and a target dict with ``costs[i]`` boxes."""

    def __init__(self, costs):
        self.costs = costs

    def __len__(self):
        return len(self.costs)

    def __getitem__(self, i):
        n = int(self.costs[i])
        return torch.full((3, 4, 4), float(i)), {"boxes": torch.full((n, 4), float(i)), "index": i}


def collate(batch):
    """The detection collate of the seed: a tuple of images and a tuple of targets."""
    return tuple(zip(*batch))


def indices_of(targets):
    return [t["index"] for t in targets]


def planned(costs, epoch, **kwargs):
    sampler = BudgetBatchSampler(costs, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


# -- Lightning ----------------------------------------------------------------------------------------

@pytest.fixture
def L():
    return pytest.importorskip("lightning", reason="the Lightning integration tests need lightning (dev extra)")


def trainer(L, **overrides):
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def recording_module(L, save_at_step=None, checkpoint=None, set_epoch_in_hook=False):
    """A LightningModule that records, per epoch, the indices of each batch and the sampler's epoch."""

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.batches = collections.defaultdict(list)  # epoch -> [indices of each batch]
            self.sampler_epochs = collections.defaultdict(set)  # epoch -> sampler.epoch seen during it
            self.at_checkpoint = None

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.batches[self.current_epoch].append(indices_of(targets))
            loader = self.trainer.train_dataloader
            self.sampler_epochs[self.current_epoch].add(getattr(loader, "loader", loader).sampler.epoch)
            return self.layer(torch.stack(images).mean(dim=(2, 3))).pow(2).mean()

        def on_train_epoch_start(self):
            if set_epoch_in_hook:
                self.trainer.train_dataloader.set_epoch(self.current_epoch)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if save_at_step is not None and self.global_step == save_at_step:
                self.trainer.save_checkpoint(checkpoint)
                self.at_checkpoint = {epoch: list(b) for epoch, b in self.batches.items()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Recorder()


def flat(batches):
    return sorted(i for batch in batches for i in batch)


def test_lightning_fit_sees_every_index_once_per_epoch_reshuffled(L):
    lengths = [len(planned(COSTS, epoch, max_cost=MAX_COST, max_batch_size=MAX_BATCH, shuffle=True, seed=5))
               for epoch in (0, 1)]
    assert lengths[0] == lengths[1]  # the plain loader is only right when len() stays put (see below)
    loader = AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                            num_workers=2, collate_fn=collate, shuffle=True, seed=5)
    module, fit = recording_module(L, set_epoch_in_hook=True), trainer(L)
    fit.fit(module, train_dataloaders=loader)

    assert fit.train_dataloader is loader  # not wrapped, no sampler injected
    assert sorted(module.batches) == [0, 1]
    for epoch, batches in module.batches.items():
        assert flat(batches) == list(range(len(COSTS)))  # every index exactly once
        assert all(len(b) <= MAX_BATCH and COSTS[b].sum() <= MAX_COST for b in batches)
        assert module.sampler_epochs[epoch] == {epoch}
        assert batches == planned(COSTS, epoch, max_cost=MAX_COST, max_batch_size=MAX_BATCH, shuffle=True, seed=5)
    assert module.batches[0] != module.batches[1]  # reshuffled


def test_lightning_alone_sets_the_loaders_epoch(L):
    loader = AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                            collate_fn=collate, shuffle=True, seed=5)
    module = recording_module(L)  # no set_epoch of its own: Lightning calls loader.sampler.set_epoch(epoch)
    trainer(L, max_epochs=3).fit(module, train_dataloaders=loader)
    for epoch, batches in module.batches.items():
        assert flat(batches) == list(range(len(COSTS)))
        assert module.sampler_epochs[epoch] == {epoch}


@pytest.mark.xfail(strict=True, reason="Lightning reads len(loader) once (FitLoop.setup_data) and ends every epoch "
                                       "after that many batches; an epoch whose packing needs more is cut short")
def test_lightning_plain_loader_sees_every_index_when_the_epoch_length_varies(L):
    loader = AdaptiveLoader(Images(LONG_COSTS), collate_fn=collate, **LONG)
    module = recording_module(L, set_epoch_in_hook=True)
    trainer(L, max_epochs=4).fit(module, train_dataloaders=loader)
    for batches in module.batches.values():
        assert flat(batches) == list(range(len(LONG_COSTS)))


def test_lightning_loader_recipe_runs_every_epoch_to_its_end(L):
    lengths = [len(planned(epoch=epoch, **LONG)) for epoch in range(4)]
    assert max(lengths[1:]) > lengths[0]  # the case where the plain loader loses samples
    records = []
    loader = AdaptiveLoader(Images(LONG_COSTS), collate_fn=collate, telemetry=records.append, **LONG)
    module = recording_module(L)
    trainer(L, max_epochs=4).fit(module, train_dataloaders=LightningLoader(loader))

    for epoch, batches in module.batches.items():
        assert flat(batches) == list(range(len(LONG_COSTS)))
        assert len(batches) == lengths[epoch]
        assert module.sampler_epochs[epoch] == {epoch}
    ends = [r for r in records if r.get("event") == "epoch_end"]
    assert [r["epoch"] for r in ends] == [0, 1, 2, 3]  # each epoch ran to its end inside the loader


def test_lightning_loader_recipe_resumes_mid_epoch_from_a_checkpoint(L, tmp_path):
    checkpoint = str(tmp_path / "mid.ckpt")

    def make():
        return LightningLoader(AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                                              num_workers=2, collate_fn=collate, shuffle=True, seed=1))

    first = recording_module(L, save_at_step=5, checkpoint=checkpoint)
    trainer(L).fit(first, train_dataloaders=make())
    saved = torch.load(checkpoint, weights_only=False)
    assert len(saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]) == 1  # our state_dict(), by Lightning

    resumed = recording_module(L)
    trainer(L).fit(resumed, train_dataloaders=make(), ckpt_path=checkpoint)
    before = first.at_checkpoint[0]
    assert len(before) == 5
    assert flat(before + resumed.batches[0]) == list(range(len(COSTS)))  # the rest of epoch 0, exactly
    assert flat(resumed.batches[1]) == list(range(len(COSTS)))


def test_lightning_plain_loader_resumes_mid_epoch_from_a_checkpoint(L, tmp_path):
    checkpoint = str(tmp_path / "mid.ckpt")

    def make():
        return AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                              collate_fn=collate, shuffle=True, seed=1)

    first = recording_module(L, save_at_step=5, checkpoint=checkpoint, set_epoch_in_hook=True)
    trainer(L).fit(first, train_dataloaders=make())
    resumed = recording_module(L, set_epoch_in_hook=True)
    trainer(L).fit(resumed, train_dataloaders=make(), ckpt_path=checkpoint)
    assert flat(first.at_checkpoint[0] + resumed.batches[0]) == list(range(len(COSTS)))
    assert flat(resumed.batches[1]) == list(range(len(COSTS)))


RANK_SCRIPT_HEAD = """
import json, sys
import numpy as np, torch
from adaptive_loader import AdaptiveLoader

COSTS = np.random.default_rng(0).integers(10, 1201, 48)

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return len(COSTS)
    def __getitem__(self, i):
        return torch.full((3,), float(i)), i
"""  # what the multi-process scripts below share

LIGHTNING_DDP = RANK_SCRIPT_HEAD + """
import lightning as L

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer, self.seen = torch.nn.Linear(3, 1), {}
    def train_dataloader(self):  # runs once the process group is up: the loader takes its world size and rank
        return AdaptiveLoader(Data(), costs=COSTS, max_cost=1500, max_batch_size=6, shuffle=True,
                              collate_fn=lambda batch: tuple(zip(*batch)))
    def on_train_epoch_start(self):
        self.trainer.train_dataloader.set_epoch(self.current_epoch)
    def training_step(self, batch, batch_idx):
        x, ids = batch
        self.seen.setdefault(self.current_epoch, []).extend(ids)
        return self.layer(torch.stack(x)).pow(2).mean()
    def on_train_end(self):
        sampler = self.trainer.train_dataloader.sampler
        with open(f"{sys.argv[1]}.{self.global_rank}", "w") as f:
            json.dump({"seen": self.seen, "replicas": sampler.num_replicas, "rank": sampler.rank}, f)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False).fit(Module())
torch.distributed.destroy_process_group()  # Lightning destroys the default group only for nccl
"""


def run_ranks(argv, out_prefix):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out_prefix.parent / f"{out_prefix.name}.{rank}").read_text()) for rank in (0, 1)]


def assert_ranks_split_every_epoch(ranks, n):
    assert [(r["replicas"], r["rank"]) for r in ranks] == [(2, 0), (2, 1)]
    for epoch in ranks[0]["seen"]:
        a, b = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(n))  # disjoint, every index once


def test_lightning_ddp_loader_built_in_train_dataloader_splits_the_epoch(L, tmp_path):
    """Lightning leaves a non-DataLoader unsharded; built in train_dataloader() (after the process group
    is initialized) the loader takes its num_replicas and rank from torch.distributed."""
    script = tmp_path / "fit_ddp.py"
    script.write_text(textwrap.dedent(LIGHTNING_DDP))
    ranks = run_ranks([sys.executable, str(script), str(tmp_path / "ranks")], tmp_path / "ranks")
    assert_ranks_split_every_epoch(ranks, 48)
    assert sorted(ranks[0]["seen"]) == ["0", "1"]


# -- accelerate -----------------------------------------------------------------------------------------

@pytest.fixture
def accelerate():
    return pytest.importorskip("accelerate", reason="the accelerate integration tests need accelerate (dev extra)")


def model_and_optimizer():
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def train_step(accelerator, model, optimizer, images):
    x = torch.stack(images).mean(dim=(2, 3)).to(accelerator.device)
    accelerator.backward(model(x).pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()


def test_accelerate_prepare_hands_the_loader_back_and_training_sees_every_index(accelerate):
    accelerator = accelerate.Accelerator(cpu=True)
    loader = AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                            num_workers=2, collate_fn=collate, shuffle=True, seed=2)
    prepared, model, optimizer = accelerator.prepare(loader, *model_and_optimizer())
    assert prepared is loader  # Accelerator._prepare_one: only DataLoaders are wrapped

    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = []
        for images, targets in loader:
            train_step(accelerator, model, optimizer, images)
            batches.append(indices_of(targets))
        assert flat(batches) == list(range(len(COSTS)))
        assert all(len(b) <= MAX_BATCH and COSTS[b].sum() <= MAX_COST for b in batches)
        epochs.append(batches)
    assert epochs[0] != epochs[1]


def test_accelerate_save_state_and_load_state_resume_mid_epoch(accelerate, tmp_path):
    def setup():
        accelerator = accelerate.Accelerator(cpu=True)
        loader = AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                                num_workers=2, collate_fn=collate, shuffle=True, seed=3)
        loader, model, optimizer = accelerator.prepare(loader, *model_and_optimizer())
        accelerator.register_for_checkpointing(loader)  # prepare() alone does not put it in save_state
        return accelerator, loader, model, optimizer

    accelerator, loader, model, optimizer = setup()
    loader.set_epoch(4)
    before = []
    for images, targets in loader:
        train_step(accelerator, model, optimizer, images)
        before.append(indices_of(targets))
        if len(before) == 4:
            accelerator.save_state(str(tmp_path / "state"))
            break

    accelerator, loader, model, optimizer = setup()
    accelerator.load_state(str(tmp_path / "state"))
    assert loader.sampler.epoch == 4
    after = [indices_of(targets) for images, targets in loader]
    assert flat(before + after) == list(range(len(COSTS)))


def test_accelerate_accumulate_does_not_see_where_the_loaders_epoch_ends(accelerate):
    """accumulate() forces a step on the last batch only for loaders accelerate prepared;
    over an AdaptiveLoader it counts batches across epochs."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    loader = AdaptiveLoader(Images(COSTS), costs=COSTS, max_cost=MAX_COST, max_batch_size=MAX_BATCH,
                            collate_fn=collate, shuffle=True)
    loader, model, optimizer = accelerator.prepare(loader, *model_and_optimizer())
    n = len(loader)
    assert n % 4 != 0
    synced = []
    for k, (images, targets) in enumerate(loader):
        with accelerator.accumulate(model):
            train_step(accelerator, model, optimizer, images)
            synced.append(accelerator.sync_gradients)
    assert len(synced) == n and not synced[-1]
    assert [k for k, s in enumerate(synced) if s] == list(range(3, n, 4))


ACCELERATE_RANKS = RANK_SCRIPT_HEAD + """
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)  # initializes the process group: build the loader after it
loader = AdaptiveLoader(Data(), costs=COSTS, max_cost=1500, max_batch_size=6, shuffle=True, num_workers=2,
                        collate_fn=lambda batch: tuple(zip(*batch)))
model = torch.nn.Linear(3, 1)
prepared, model, optimizer = accelerator.prepare(loader, model, torch.optim.SGD(model.parameters(), lr=0.01))
assert prepared is loader and accelerator.num_processes == 2, (prepared, accelerator.num_processes)
seen = {}
for epoch in range(2):
    loader.set_epoch(epoch)
    for x, ids in loader:
        accelerator.backward(model(torch.stack(x)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        seen.setdefault(str(epoch), []).extend(ids)
with open(f"{sys.argv[1]}.{accelerator.process_index}", "w") as f:
    json.dump({"seen": seen, "replicas": loader.sampler.num_replicas, "rank": loader.sampler.rank}, f)
accelerator.end_training()  # destroys the process group
"""


def test_accelerate_two_processes_split_the_epoch(accelerate, tmp_path):
    """Under torchrun, Accelerator() initializes the process group; prepare() still hands the loader back,
    and the loader built after it takes its num_replicas and rank from torch.distributed."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(ACCELERATE_RANKS))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
            str(tmp_path / "ranks")]
    assert_ranks_split_every_epoch(run_ranks(argv, tmp_path / "ranks"), 48)

"""AdaptiveLoader with plenty of shm: DataLoader behaviour, argument checks, resume."""

import inspect
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from adaptive_loader import AdaptiveLoader, BudgetBatchSampler
from stress.workloads import SegmentationDataset, detection_collate

COSTS = np.random.default_rng(0).integers(10, 1201, 90)


def ids(loader):
    return [list(batch[2]) for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_as_the_plain_sampler_when_shm_is_plenty(workers):
    dataset = SegmentationDataset(COSTS, side=4)
    loader = AdaptiveLoader(dataset, costs=COSTS, max_cost=1500, max_batch_size=10, num_workers=workers,
                            collate_fn=detection_collate, shuffle=True, seed=3)
    plain = BudgetBatchSampler(COSTS, max_cost=1500, max_batch_size=10, shuffle=True, seed=3)
    assert ids(loader) == list(plain)
    assert loader.fallbacks == {}
    assert len(loader) == len(plain)


def test_epochs_reshuffle_and_each_delivers_everything():
    dataset = SegmentationDataset(COSTS, side=4)
    loader = AdaptiveLoader(dataset, costs=COSTS, max_cost=1500, num_workers=2, collate_fn=detection_collate,
                            shuffle=True, persistent_workers=True)
    first = ids(loader)
    loader.set_epoch(1)
    second = ids(loader)
    assert first != second
    for epoch in (first, second):
        assert sorted(i for b in epoch for i in b) == list(range(len(COSTS)))


def test_default_collate_pin_memory_and_worker_init_fn_pass_through(tmp_path):
    def init(worker_id):
        (tmp_path / f"w{worker_id}").write_text("ok")

    dataset = [{"x": torch.full((3,), float(i)), "i": i} for i in range(20)]
    loader = AdaptiveLoader(dataset, batch_size=4, num_workers=2, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=init, prefetch_factor=3)
    batches = list(loader)
    assert [b["x"].shape for b in batches] == [torch.Size([4, 3])] * 5
    assert sorted(int(i) for b in batches for i in b["i"]) == list(range(20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0", "w1"]


def test_wrap_keeps_the_dataloader_settings():
    dataset = SegmentationDataset(COSTS, side=4)
    dl = DataLoader(dataset, batch_size=7, shuffle=True, num_workers=2, collate_fn=detection_collate,
                    prefetch_factor=3, drop_last=False)
    loader = AdaptiveLoader.wrap(dl, costs=COSTS, max_cost=2000)
    assert loader.sampler.max_batch_size == 7 and loader.sampler.shuffle and loader.max_cost == 2000
    assert loader.num_workers == 2 and loader.prefetch_factor == 3 and loader.collate_fn is detection_collate
    got = ids(loader)
    assert sorted(i for b in got for i in b) == list(range(len(COSTS)))
    assert all(len(b) <= 7 and COSTS[b].sum() <= 2000 for b in got)


def test_the_seeds_trap_is_named():
    """A batch sampler passed as sampler= makes DataLoader yield batches of one."""
    dataset = SegmentationDataset(COSTS, side=4)
    batch_sampler = BatchSampler(SequentialSampler(dataset), 10, False)
    trap = DataLoader(dataset, sampler=batch_sampler, collate_fn=detection_collate)
    with pytest.raises(ValueError, match="passed as sampler=.*batch_sampler="):
        AdaptiveLoader.wrap(trap)
    with pytest.raises(ValueError, match="passed as sampler="):
        AdaptiveLoader(dataset, sampler=BudgetBatchSampler(COSTS, max_cost=10))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(costs=[1, 2, 3]), ValueError, "costs has 3 entries but the dataset has 90"),
    (dict(costs=COSTS, max_cost=-5), ValueError, "max_cost must be > 0"),
    (dict(costs=COSTS, max_cost=float("nan")), ValueError, "max_cost must be > 0"),
    (dict(costs=-COSTS), ValueError, r"costs\[0\] = -"),
    (dict(shm_path="/no/such/shm"), ValueError, "shm_path '/no/such/shm' does not exist"),
    (dict(safety=1.5), ValueError, "safety must be a number in"),
    (dict(stall_timeout=0), ValueError, "stall_timeout must be a number > 0"),
    (dict(num_workers=-1), ValueError, "num_workers"),
    (dict(batch_size=4, max_batch_size=5), ValueError, "disagree"),
    (dict(batch_sampler=[[0]]), ValueError, "batch_sampler= cannot be passed"),
    # DataLoader has in_order= from torch 2.6 on; before, the keyword is unknown there and here alike
    (dict(in_order=False), *((ValueError, "in_order=False") if "in_order" in inspect.signature(DataLoader).parameters
                             else (TypeError, "unknown keyword.*in_order"))),
    (dict(telemetry=42), TypeError, "telemetry must be"),
    (dict(telemetry="/no/such/dir/run.jsonl"), ValueError, "does not exist"),
])
def test_bad_arguments_fail_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AdaptiveLoader(SegmentationDataset(COSTS, side=4), **kwargs)


def test_a_dataset_neither_map_style_nor_a_stream_is_refused():
    class Generator:  # iterable, but no IterableDataset and no __len__
        def __iter__(self):
            yield 1

        def __getitem__(self, i):
            return i

    with pytest.raises(TypeError, match="map-style dataset .* or an IterableDataset"):
        AdaptiveLoader(Generator())


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_with_exactly_the_undelivered_samples(workers):
    dataset = SegmentationDataset(COSTS, side=4)
    make = lambda: AdaptiveLoader(dataset, costs=COSTS, max_cost=1500, num_workers=workers,
                                  collate_fn=detection_collate, shuffle=True, seed=5)
    first = make()
    it = iter(first)
    head = [list(next(it)[2]) for _ in range(6)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # with batches still in flight
    del it
    second = make()
    second.load_state_dict(state)
    tail = ids(second)
    delivered = [i for b in head + tail for i in b]
    assert sorted(delivered) == list(range(len(COSTS)))


def test_telemetry_records_every_batch(tmp_path):
    records = []
    path = tmp_path / "run.jsonl"
    dataset = SegmentationDataset(COSTS, side=4)
    loader = AdaptiveLoader(dataset, costs=COSTS, max_cost=1500, num_workers=2, collate_fn=detection_collate,
                            telemetry=[records.append, str(path)])
    n = len(ids(loader))
    batches = [r for r in records if r["kind"] == "batch"]
    assert len(batches) == n and sum(r["samples"] for r in batches) == len(COSTS)
    assert all(r["transport"] in ("memfd", "arena") and r["bytes"] > 0 for r in batches)
    assert len(path.read_text().splitlines()) == len(records)


def test_wrap_refuses_samplers_it_cannot_reproduce_and_takes_batch_size():
    dataset = SegmentationDataset(COSTS, side=4)
    subset = DataLoader(dataset, sampler=torch.utils.data.SubsetRandomSampler(range(8)), batch_size=4)
    with pytest.raises(ValueError, match="SubsetRandomSampler, which AdaptiveLoader cannot reproduce"):
        AdaptiveLoader.wrap(subset)
    loader = AdaptiveLoader.wrap(DataLoader(dataset, batch_size=4, generator=torch.Generator().manual_seed(7)),
                                 batch_size=8, collate_fn=detection_collate)
    assert loader.sampler.max_batch_size == 8 and not loader.sampler.shuffle


def test_wrap_shuffles_from_the_dataloaders_generator():
    dataset = SegmentationDataset(COSTS, side=4)

    def first_epoch(seed):
        wrapped = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return list(AdaptiveLoader.wrap(wrapped, collate_fn=detection_collate).sampler)

    assert first_epoch(7) == first_epoch(7)
    assert first_epoch(7) != first_epoch(8)


def test_unknown_or_bad_dataloader_keywords_fail_at_construction():
    dataset = SegmentationDataset(COSTS, side=4)
    with pytest.raises(TypeError, match="unknown keyword.*pin_memroy"):
        AdaptiveLoader(dataset, pin_memroy=True)
    with pytest.raises(ValueError, match="timeout must be a number >= 0"):
        AdaptiveLoader(dataset, timeout=-1)
    with pytest.raises(ValueError, match="prefetch_factor must be an int >= 1"):
        AdaptiveLoader(dataset, num_workers=1, prefetch_factor=0)


def test_without_set_epoch_each_iteration_takes_the_next_epoch():
    dataset = SegmentationDataset(COSTS, side=4)
    loader = AdaptiveLoader(dataset, costs=COSTS, max_cost=1500, collate_fn=detection_collate, shuffle=True)
    first, second = ids(loader), ids(loader)
    assert first != second and loader.sampler.epoch == 1
    loader.set_epoch(1)
    assert ids(loader) == second  # chosen explicitly: that epoch again


def test_leaving_early_still_ends_the_epoch_record_and_close_stops_everything(tmp_path):
    records = []
    dataset = SegmentationDataset(COSTS, side=4)
    with AdaptiveLoader(dataset, costs=COSTS, max_cost=1500, num_workers=2, collate_fn=detection_collate,
                        persistent_workers=True, telemetry=[records.append, str(tmp_path / "run.jsonl")]) as loader:
        for step, _ in enumerate(loader):
            if step == 1:
                break
    ends = [r for r in records if r.get("event") == "epoch_end"]
    assert len(ends) == 1 and ends[0]["data"]["completed"] is False
    assert loader._pipeline.dataloader is None
    assert (tmp_path / "run.jsonl").read_text().count("epoch_end") == 1

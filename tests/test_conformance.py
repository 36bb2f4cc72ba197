"""AdaptiveLoader beside DataLoader: what a user can observe should be the same (issue 14).

Each scenario runs through ``DataLoader(batch_size=B)`` and ``AdaptiveLoader(max_batch_size=B)``
without ``max_cost``, where the batches should be DataLoader's. What a batch-budget loader cannot
match is listed, with the reason, in docs/integrations.md ("Differences from DataLoader").
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import re
import time
import warnings

import pytest
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, SubsetRandomSampler, default_collate, get_worker_info)

from adaptive_loader import AdaptiveLoader

B = 3
N = 10
CPUS = len(os.sched_getaffinity(0))
LOADERS = ["DataLoader", "AdaptiveLoader"]


def tensors(n: int = N):
    return [torch.tensor(i) for i in range(n)]


def make(kind: str, dataset, batch_size: int = B, **kwargs):
    """The same loader as either kind: ``batch_size`` is AdaptiveLoader's ``max_batch_size``."""
    if kind == "DataLoader":
        return DataLoader(dataset, batch_size=batch_size, **kwargs)
    return AdaptiveLoader(dataset, max_batch_size=batch_size, **kwargs)


def both(dataset, batch_size: int = B, **kwargs):
    return make("DataLoader", dataset, batch_size, **kwargs), make("AdaptiveLoader", dataset, batch_size, **kwargs)


def as_lists(loader):
    return [batch.tolist() for batch in loader]


def flat(batches):
    return [i for batch in batches for i in batch]


class FailsAt(Dataset):
    """Raises ValueError for the indices in ``bad``."""

    def __init__(self, n: int, bad) -> None:
        self.n, self.bad = n, set(bad)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise ValueError(f"bad sample {i}")
        return torch.tensor(i)


class Probe(Dataset):
    """Each sample reports where it was loaded: worker info, seeds, the process."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        info = get_worker_info()
        return dict(index=i, pid=os.getpid(), torch_seed=torch.initial_seed(), py_random=random.random(),
                    worker=None if info is None else info.id, workers=None if info is None else info.num_workers,
                    seed=None if info is None else info.seed,
                    dataset=None if info is None else (type(info.dataset).__name__, len(info.dataset)))


class Slow(Dataset):
    def __init__(self, n: int, slow: int, seconds: float) -> None:
        self.n, self.slow, self.seconds = n, slow, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.slow:
            time.sleep(self.seconds)
        return torch.tensor(i)


def records(loader):
    """Every sample's Probe record, in delivery order (the loaders use collate_fn=list)."""
    return [record for batch in loader for record in batch]


def _touch(directory: str, worker_id: int) -> None:
    """A worker_init_fn: one file per call, named by the worker id it got and the worker's pid."""
    assert get_worker_info().id == worker_id
    with open(os.path.join(directory, f"{worker_id}-{os.getpid()}"), "x"):
        pass


def inits(directory) -> list:
    return sorted(tuple(int(part) for part in name.split("-")) for name in os.listdir(directory))


# -- batches, order, len ------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (2, 5), (1, 1)])
def test_same_batches_in_the_same_order_without_shuffle(workers, n, batch_size):
    dl, al = both(tensors(n), batch_size, num_workers=workers)
    assert as_lists(al) == as_lists(dl)


@pytest.mark.parametrize("n, batch_size", [(9, 4), (10, 4), (12, 4), (3, 4)])
def test_drop_last_drops_the_short_final_batch_as_dataloader(n, batch_size):
    dl, al = both(tensors(n), batch_size, drop_last=True)
    assert as_lists(al) == as_lists(dl)


@pytest.mark.timeout(120)
def test_drop_last_still_drops_after_the_memory_budget_was_set():
    """With workers the controller sets a finite budget after the first batches; a size cap that
    the budget does not bind keeps DataLoader's rule in every later epoch."""
    dl, al = both(tensors(14), 3, drop_last=True, num_workers=2)
    for _ in range(3):
        assert as_lists(al) == as_lists(dl) and len(al) == len(dl)
    al.close()


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n, batch_size", [(0, 3), (1, 3), (10, 3), (12, 4), (10, 4)])
def test_len_as_dataloader(n, batch_size, drop_last):
    dl, al = both(tensors(n), batch_size, drop_last=drop_last)
    assert len(al) == len(dl)


def test_an_empty_dataset_gives_an_empty_epoch():
    dl, al = both(tensors(0))
    assert as_lists(al) == as_lists(dl) == []


# -- a dataset whose length changes -------------------------------------------------------------------

def grow(dataset: list, to: int) -> None:
    dataset.extend(torch.tensor(i) for i in range(len(dataset), to))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("kind", LOADERS)
def test_len_follows_a_list_that_grew_after_construction(kind, shuffle):
    # torch's test_growing_dataset (test/test_dataloader.py), as it is written there
    dataset = [torch.ones(4) for _ in range(4)]
    loader = (DataLoader if kind == "DataLoader" else AdaptiveLoader)(dataset, shuffle=shuffle)
    dataset.append(torch.ones(4))
    assert len(loader) == 5


@pytest.mark.parametrize("shuffle, drop_last, workers", [(False, False, 0), (True, False, 0), (False, True, 0),
                                                      (False, False, 2), (True, False, 2)])
def test_after_the_dataset_grew_len_and_the_next_epoch_are_dataloaders(shuffle, drop_last, workers):
    dataset = tensors(10)
    dl, al = both(dataset, B, shuffle=shuffle, drop_last=drop_last, num_workers=workers)
    as_lists(dl), as_lists(al)  # an epoch over the 10 samples first
    grow(dataset, 14)
    assert len(al) == len(dl) == (4 if drop_last else 5)
    theirs, ours = as_lists(dl), as_lists(al)
    assert sorted(flat(ours)) == sorted(flat(theirs)) == list(range(12 if drop_last else 14))  # each once
    assert len(ours) == len(al)
    if not shuffle:
        assert ours == theirs


def test_len_between_epochs_restarts_persistent_workers_that_hold_the_old_dataset():
    # DataLoader's persistent workers keep the list they were started with: index 10 is out of their range
    dataset = tensors(10)
    al = AdaptiveLoader(dataset, max_batch_size=B, num_workers=2, persistent_workers=True)
    as_lists(al)
    grow(dataset, 14)
    assert len(al) == 5
    assert flat(as_lists(al)) == list(range(14))


def test_the_epoch_under_way_keeps_its_length_and_its_samples_and_the_next_one_follows():
    # DataLoader's len() says 5 at once, while the epoch under way delivers the 10 samples it started with
    dataset = tensors(10)
    al = AdaptiveLoader(dataset, max_batch_size=B)
    iterator = iter(al)
    first = next(iterator).tolist()
    grow(dataset, 14)
    assert len(al) == len(iterator) == 4
    assert flat([first] + as_lists(iterator)) == list(range(10))
    assert len(al) == 5
    assert flat(as_lists(al)) == list(range(14))


@pytest.mark.parametrize("given", ["numbers", "callable"])
def test_costs_given_as_numbers_cannot_follow_and_len_says_so_between_epochs(given):
    dataset = tensors(10)
    al = AdaptiveLoader(dataset, max_batch_size=B, costs=[1.0] * 10 if given == "numbers" else lambda i: 1.0)
    iterator = iter(al)
    next(iterator)
    grow(dataset, 13)
    assert len(al) == 4  # the epoch under way still has its plan
    as_lists(iterator)
    if given == "callable":
        assert len(al) == 5 and flat(as_lists(al)) == list(range(13))
        return
    refused = "the dataset now has 13 samples but costs= was given for 10: pass costs as a callable"
    with pytest.raises(ValueError, match=refused):
        len(al)  # the error the next epoch would raise, not a length it cannot deliver
    with pytest.raises(ValueError, match=refused):
        next(iter(al))


def test_a_resumed_epoch_ends_over_the_samples_it_was_saved_with_then_the_next_one_follows():
    dataset = tensors(10)
    make_loader = lambda: AdaptiveLoader(dataset, max_batch_size=B, shuffle=True, seed=3)  # noqa: E731
    first = make_loader()
    iterator = iter(first)
    head = [next(iterator).tolist() for _ in range(2)]
    state = first.state_dict()
    first.close()
    second = make_loader()
    second.load_state_dict(state)
    grow(dataset, 14)
    assert len(second) == 4  # the resumed epoch, counted whole
    assert sorted(flat(head + as_lists(second))) == list(range(10))
    assert len(second) == 5
    assert sorted(flat(as_lists(second))) == list(range(14))


def test_with_several_ranks_each_rank_follows_as_a_loader_built_over_the_grown_dataset():
    dataset = tensors(10)
    ranks = lambda: [AdaptiveLoader(dataset, max_batch_size=B, num_replicas=2, rank=rank, shuffle=True, seed=1)
                     for rank in range(2)]  # noqa: E731
    grown = ranks()
    for loader in grown:
        as_lists(loader)  # epoch 0 over 10 samples
    grow(dataset, 14)
    built = ranks()
    for loader in built:
        loader.set_epoch(1)
    assert [len(loader) for loader in grown] == [len(loader) for loader in built] == [3, 3]
    epochs = [as_lists(loader) for loader in grown]
    assert epochs == [as_lists(loader) for loader in built]
    assert sorted(flat(epochs[0] + epochs[1])) == list(range(14))


# -- shuffle --------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_shuffle_delivers_every_index_once_in_dataloaders_batch_sizes_and_reshuffles(workers):
    dl, al = both(tensors(20), 4, shuffle=True, num_workers=workers)
    theirs, first, second = as_lists(dl), as_lists(al), as_lists(al)
    assert sorted(flat(first)) == sorted(flat(second)) == sorted(flat(theirs)) == list(range(20))
    assert sorted(map(len, first)) == sorted(map(len, theirs))
    assert first != second


@pytest.mark.parametrize("kind", LOADERS)
def test_shuffle_follows_the_generator(kind):
    def epoch(seed):
        return as_lists(make(kind, tensors(20), 4, shuffle=True, generator=torch.Generator().manual_seed(seed)))

    assert epoch(1) == epoch(1)
    assert epoch(1) != epoch(2)


@pytest.mark.parametrize("kind", LOADERS)
def test_shuffle_follows_torch_manual_seed(kind):
    def epoch(seed):
        torch.manual_seed(seed)
        return as_lists(make(kind, tensors(20), 4, shuffle=True))

    assert epoch(1) == epoch(1)
    assert epoch(1) != epoch(2)


def test_without_generator_the_shuffle_is_drawn_from_torchs_rng_at_construction():
    def epoch(draws_in_between):
        torch.manual_seed(3)
        loader = AdaptiveLoader(tensors(20), max_batch_size=4, shuffle=True)
        torch.rand(draws_in_between)
        return as_lists(loader)

    assert epoch(0) == epoch(5)


def test_an_explicit_seed_wins_over_the_generator():
    def epoch(seed, generator_seed):
        return as_lists(AdaptiveLoader(tensors(20), max_batch_size=4, shuffle=True, seed=seed,
                                       generator=torch.Generator().manual_seed(generator_seed)))

    assert epoch(4, 1) == epoch(4, 2)
    assert epoch(4, 1) != epoch(5, 1)


# -- errors from a sample -----------------------------------------------------------------------

def outcomes(loader, limit: int = 50):
    """What a loop that skips bad batches sees: each batch, or the error's type and message."""
    seen, iterator = [], iter(loader)
    for _ in range(limit):
        try:
            batch = next(iterator)
        except StopIteration:
            return seen
        except ValueError as exc:
            seen.append(("ValueError", "bad sample 5" in str(exc)))
            continue
        seen.append(batch.tolist())
    raise AssertionError(f"more than {limit} outcomes: {seen}")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_a_sample_surfaces_and_the_epoch_goes_on(workers):
    dl, al = both(FailsAt(10, bad={5}), 2, num_workers=workers)
    expected = [[0, 1], [2, 3], ("ValueError", True), [6, 7], [8, 9]]
    assert outcomes(dl) == expected
    assert outcomes(al) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_after_an_error_the_next_epoch_is_whole(workers):
    dl, al = both(FailsAt(10, bad={5}), 2, num_workers=workers)
    for loader in (dl, al):
        outcomes(loader)
        loader.dataset.bad.clear()  # workers fork at each epoch's start: they see it cleared
    assert as_lists(al) == as_lists(dl) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


# -- attributes ------------------------------------------------------------------------------------

ATTRIBUTES = ["batch_size", "pin_memory", "drop_last", "timeout", "worker_init_fn", "multiprocessing_context",
              "generator", "persistent_workers", "pin_memory_device", "in_order", "num_workers", "prefetch_factor",
              "dataset", "collate_fn"]
REFUSED_AFTER_CONSTRUCTION = ["batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers"]


def _init(worker_id: int) -> None:
    pass


def _collate(batch):
    return default_collate(batch)


def settings(workers: int) -> dict:
    if workers == 0:
        return dict(drop_last=False, pin_memory=False)
    return dict(num_workers=workers, drop_last=True, timeout=5.0, worker_init_fn=_init, collate_fn=_collate,
                multiprocessing_context="fork", generator=torch.Generator().manual_seed(1),
                persistent_workers=True, prefetch_factor=3)


def same_attribute(attribute: str, ours, theirs) -> bool:
    if attribute == "multiprocessing_context" and theirs is not None:
        return isinstance(ours, multiprocessing.context.BaseContext) and \
            ours.get_start_method() == theirs.get_start_method()
    if attribute in ("dataset", "collate_fn", "worker_init_fn", "generator"):
        return ours is theirs
    if isinstance(theirs, bool) or theirs is None or isinstance(theirs, str):
        return type(ours) is type(theirs) and ours == theirs
    return ours == theirs  # timeout 0 and 0.0 are the same to a user


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_attribute_as_dataloader(attribute, workers):
    dataset = tensors()
    kwargs = settings(workers)
    dl = DataLoader(dataset, batch_size=B, **kwargs)
    if not hasattr(dl, attribute):
        pytest.skip(f"this torch's DataLoader has no {attribute}")
    al = AdaptiveLoader(dataset, max_batch_size=B, **kwargs)
    ours, theirs = getattr(al, attribute), getattr(dl, attribute)
    assert same_attribute(attribute, ours, theirs), f"{attribute}: AdaptiveLoader {ours!r}, DataLoader {theirs!r}"


@pytest.mark.parametrize("attribute", REFUSED_AFTER_CONSTRUCTION)
def test_assignment_after_construction_refused_as_dataloader(attribute):
    dl = DataLoader(tensors(), batch_size=B, num_workers=1)
    al = AdaptiveLoader(tensors(), max_batch_size=B, num_workers=1)
    with pytest.raises(ValueError) as theirs:
        setattr(dl, attribute, getattr(dl, attribute))
    with pytest.raises(theirs.type, match=attribute):
        setattr(al, attribute, getattr(dl, attribute))


# -- construction errors ----------------------------------------------------------------------------

REFUSED_BY_BOTH = [
    dict(num_workers=-1),
    dict(num_workers="2"),
    dict(timeout=-1),
    dict(prefetch_factor=2),
    dict(num_workers=1, prefetch_factor=-1),
    dict(persistent_workers=True),
    dict(num_workers=1, multiprocessing_context="bogus"),
    dict(num_workers=1, multiprocessing_context=object()),
    dict(multiprocessing_context="spawn"),
    dict(shuffle=True, sampler=SequentialSampler(range(N))),
    dict(batch_sampler=BatchSampler(SequentialSampler(range(N)), 2, False), drop_last=True),
]


def _id(kwargs: dict) -> str:
    shown = lambda v: repr(v) if isinstance(v, (str, int)) else type(v).__name__  # noqa: E731
    return ",".join(f"{a}={shown(v)}" for a, v in kwargs.items())


@pytest.mark.parametrize("kwargs", REFUSED_BY_BOTH, ids=_id)
def test_construction_errors_of_the_same_type_as_dataloader(kwargs):
    with pytest.raises((TypeError, ValueError)) as theirs:
        DataLoader(tensors(), **kwargs)
    with pytest.raises(theirs.type):
        AdaptiveLoader(tensors(), **kwargs)


class Counting(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _torch_invalid_ctor_cases():
    """torch's own test_invalid_ctor_args_combinations (test/test_dataloader.py), case by case: the
    exception DataLoader raises and the regex torch's test matches its message with."""
    dataset, iterable = tensors(20), Counting(20)
    sampler = SequentialSampler(dataset)
    batch_sampler = BatchSampler(sampler, 3, False)
    context = torch.multiprocessing.get_all_start_methods()[-1]
    exclusive = "batch_sampler option is mutually exclusive with"
    unspecified = "DataLoader with IterableDataset: expected unspecified "
    cases = [
        (ValueError, "num_workers option should be non-negative", dataset, dict(num_workers=-1)),
        (ValueError, "timeout option should be non-negative", dataset, dict(timeout=-1)),
        (ValueError, "batch_size=None option disables auto-batching and is mutually exclusive", dataset,
         dict(batch_size=None, drop_last=True)),
        (ValueError, r"multi-process loading \(num_workers > 0\), but got", dataset,
         dict(num_workers=0, multiprocessing_context=context)),
        (ValueError, "should specify a valid start method in", dataset,
         dict(num_workers=1, multiprocessing_context="bad")),
        (TypeError, "multiprocessing_context option should be a valid context ", dataset,
         dict(num_workers=1, multiprocessing_context=object())),
        (ValueError, "sampler option is mutually exclusive with shuffle", dataset,
         dict(batch_size=11, sampler=sampler, shuffle=True)),
        (ValueError, "sampler option is mutually exclusive with shuffle", dataset,
         dict(batch_sampler=batch_sampler, sampler=sampler, shuffle=True)),
        (ValueError, "sampler option is mutually exclusive with shuffle", dataset,
         dict(batch_sampler=batch_sampler, sampler=sampler, shuffle=3)),
        (ValueError, exclusive, dataset, dict(batch_size=11, batch_sampler=batch_sampler)),
        (ValueError, exclusive, dataset, dict(shuffle=True, batch_sampler=batch_sampler)),
        (ValueError, exclusive, dataset, dict(drop_last=True, batch_sampler=batch_sampler)),
        (ValueError, exclusive, dataset, dict(drop_last=3, batch_sampler=batch_sampler)),
        (ValueError, unspecified + "shuffle", iterable, dict(shuffle=True)),
        (ValueError, unspecified + "shuffle", iterable, dict(shuffle=3)),
        (ValueError, unspecified + "sampler", iterable, dict(sampler=SequentialSampler(iterable))),
        (ValueError, unspecified + "sampler", iterable, dict(sampler=3)),
        (ValueError, unspecified + "batch_sampler", iterable,
         dict(batch_sampler=BatchSampler(SequentialSampler(iterable), 3, False))),
        (ValueError, unspecified + "batch_sampler", iterable, dict(batch_sampler=3)),
    ]
    return [pytest.param(exc, pattern, dataset, kwargs, id=f"{type(dataset).__name__}:{_id(kwargs)}")
            for exc, pattern, dataset, kwargs in cases]


@pytest.mark.parametrize("exc, pattern, dataset, kwargs", _torch_invalid_ctor_cases())
@pytest.mark.parametrize("kind", LOADERS)
def test_invalid_argument_combinations_raise_dataloaders_exception_in_its_words(kind, exc, pattern, dataset, kwargs):
    # AdaptiveLoader refuses sampler= and batch_sampler= always; where DataLoader refuses the combination
    # too, the message starts with DataLoader's words, then says what to pass instead
    with pytest.raises(exc, match=pattern) as raised:
        (DataLoader if kind == "DataLoader" else AdaptiveLoader)(dataset, **kwargs)
    assert type(raised.value) is exc


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="7"), TypeError, "seed"),
    (dict(timeout=float("nan")), ValueError, "timeout"),
    (dict(generator=7), TypeError, "generator"),
    (dict(worker_init_fn="init", num_workers=1), TypeError, "worker_init_fn"),
    (dict(pin_memory_device=3), TypeError, "pin_memory_device"),
])
def test_what_dataloader_would_trip_over_later_is_refused_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AdaptiveLoader(tensors(), max_batch_size=B, **kwargs)


# -- workers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_get_worker_info_as_in_dataloader(workers):
    dl, al = both(Probe(), 2, num_workers=workers, collate_fn=list)
    theirs, ours = records(dl), records(al)
    seen = lambda rs: sorted({(r["worker"], r["workers"], r["dataset"]) for r in rs}, key=repr)  # noqa: E731
    assert seen(ours) == seen(theirs)
    expected = [(None, None, None)] if workers == 0 else [(w, workers, ("Probe", N)) for w in range(workers)]
    assert seen(theirs) == expected


def worker_seeds(loader) -> dict:
    """worker id -> (get_worker_info().seed, torch.initial_seed(), first random.random())."""
    seeds = {}
    for record in records(loader):
        seeds.setdefault(record["worker"], (record["seed"], record["torch_seed"], record["py_random"]))
    return seeds


@pytest.mark.parametrize("kind", LOADERS)
def test_worker_seeds_are_distinct_and_follow_the_generator(kind):
    def run(seed):
        return worker_seeds(make(kind, Probe(12), 2, num_workers=2, collate_fn=list,
                                 generator=torch.Generator().manual_seed(seed)))

    first = run(7)
    assert sorted(first) == [0, 1]
    assert all(seed == torch_seed for seed, torch_seed, _ in first.values())
    assert len({seed for seed, _, _ in first.values()}) == 2
    assert len({py for _, _, py in first.values()}) == 2
    assert run(7) == first
    assert run(8) != first


@pytest.mark.parametrize("kind", LOADERS)
def test_each_epoch_draws_new_worker_seeds(kind):
    loader = make(kind, Probe(12), 2, num_workers=2, collate_fn=list, generator=torch.Generator().manual_seed(7))
    assert worker_seeds(loader) != worker_seeds(loader)


@pytest.mark.parametrize("kind", LOADERS)
def test_worker_init_fn_runs_once_per_worker_with_its_id(kind, tmp_path):
    loader = make(kind, Probe(12), 2, num_workers=2, collate_fn=list, worker_init_fn=functools.partial(
        _touch, str(tmp_path)))
    pids = {r["worker"]: r["pid"] for r in records(loader)}
    assert inits(tmp_path) == sorted(pids.items())


@pytest.mark.parametrize("kind", LOADERS)
def test_worker_init_fn_assigned_after_construction_is_used(kind, tmp_path):
    # DataLoader allows it, and Lightning's seed_everything(workers=True) does it to any loader whose
    # worker_init_fn is None (lightning.fabric.utilities.data._auto_add_worker_init_fn)
    loader = make(kind, Probe(12), 2, num_workers=2, collate_fn=list)
    loader.worker_init_fn = functools.partial(_touch, str(tmp_path))
    pids = {r["worker"]: r["pid"] for r in records(loader)}
    assert inits(tmp_path) == sorted(pids.items())


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("kind", LOADERS)
def test_persistent_workers_are_kept_across_epochs(kind, persistent):
    loader = make(kind, Probe(8), 2, num_workers=2, collate_fn=list, persistent_workers=persistent)
    epochs = [{r["pid"] for r in records(loader)} for _ in range(2)]
    assert len(epochs[0]) == 2
    assert (epochs[0] == epochs[1]) is persistent


@pytest.mark.parametrize("kind", LOADERS)
def test_timeout_raises_on_a_slow_sample(kind):
    loader = make(kind, Slow(4, slow=2, seconds=1.5), 1, num_workers=1, timeout=0.5)
    iterator = iter(loader)
    assert [next(iterator).tolist() for _ in range(2)] == [[0], [1]]
    with pytest.raises(RuntimeError):
        next(iterator)


def _worker_warnings(caught) -> int:
    return sum("excessive worker creation" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", LOADERS)
def test_the_worker_count_warning_comes_once_at_construction(kind):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(kind, tensors(), num_workers=CPUS + 1)
    assert _worker_warnings(caught) == 1


@pytest.mark.skipif(CPUS > 8, reason=f"it would start {CPUS + 1} workers per loader")
def test_the_worker_count_warning_is_not_repeated_more_than_dataloader_while_iterating():
    counts = []
    for loader in both(tensors(CPUS + 1), 1, num_workers=CPUS + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            as_lists(loader)
        counts.append(_worker_warnings(caught))
    theirs, ours = counts
    assert ours <= theirs


@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()])
def test_spawn_and_forkserver_give_dataloaders_batches(method):
    # DataLoader's batches do not depend on the start method; a started interpreter imports torch (seconds)
    al = AdaptiveLoader(tensors(6), max_batch_size=2, num_workers=1, multiprocessing_context=method)
    assert as_lists(al) == as_lists(DataLoader(tensors(6), batch_size=2)) == [[0, 1], [2, 3], [4, 5]]
    assert al.multiprocessing_context.get_start_method() == method


# -- wrap() ---------------------------------------------------------------------------------------------

class GroupedBatchSampler(BatchSampler):
    """torchvision's detection reference in miniature: batches of one group (aspect-ratio bin) each,
    drawn in the order of an inner sampler."""

    def __init__(self, sampler: Sampler, group_ids, batch_size: int) -> None:
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def __iter__(self):
        buffers = {}
        for index in self.sampler:
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()
        for buffer in buffers.values():
            if buffer:
                yield list(buffer)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class OwnBatches(Sampler):
    """A batch sampler with no grouping AdaptiveLoader could take over."""

    def __iter__(self):
        yield [3, 1]
        yield [0, 2]

    def __len__(self) -> int:
        return 2


def test_wrap_keeps_the_settings_and_the_batches():
    dl = DataLoader(tensors(12), batch_size=B, **settings(2))
    al = AdaptiveLoader.wrap(dl)
    differ = [a for a in ATTRIBUTES if hasattr(dl, a) and not same_attribute(a, getattr(al, a, None), getattr(dl, a))]
    assert differ == []
    assert as_lists(al) == as_lists(dl)


def test_wrap_keeps_a_shuffle_seeded_by_the_dataloaders_generator():
    def epoch(seed):
        dl = DataLoader(tensors(20), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return as_lists(AdaptiveLoader.wrap(dl))

    assert sorted(flat(epoch(1))) == list(range(20))
    assert epoch(1) == epoch(1) != epoch(2)


def test_wrap_keeps_a_shuffle_seeded_by_the_samplers_own_generator():
    def epoch(seed):
        dataset = tensors(20)
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        return as_lists(AdaptiveLoader.wrap(DataLoader(dataset, batch_size=4, sampler=sampler)))

    assert epoch(1) == epoch(1) != epoch(2)


def test_wrap_converts_a_grouped_batch_sampler_to_groups_and_shuffle():
    dataset = tensors(30)
    group_ids = [i % 3 for i in range(30)]
    dl = DataLoader(dataset, batch_sampler=GroupedBatchSampler(RandomSampler(dataset), group_ids, 4))
    al = AdaptiveLoader.wrap(dl)
    first, second = as_lists(al), as_lists(al)
    for epoch in (first, second):
        assert sorted(flat(epoch)) == list(range(30))
        assert all(len({group_ids[i] for i in batch}) == 1 for batch in epoch), epoch
        assert max(map(len, epoch)) == 4
    assert flat(first) != sorted(flat(first))  # shuffled, as the inner RandomSampler did
    assert first != second
    assert al.batch_size == 4


def test_wrap_converts_a_batch_sampler_over_a_random_sampler_to_shuffle():
    dataset = tensors(20)
    dl = DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 4, drop_last=False))
    al = AdaptiveLoader.wrap(dl)
    epoch = as_lists(al)
    assert sorted(flat(epoch)) == list(range(20)) and sorted(map(len, epoch)) == [4] * 5
    assert flat(epoch) != list(range(20))


def test_wrap_keeps_a_batch_sampler_over_a_sequential_sampler():
    dataset = tensors(10)
    dl = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 3, drop_last=False))
    assert as_lists(AdaptiveLoader.wrap(dl)) == as_lists(dl)


def _unwrappable():
    dataset = tensors(10)
    return {
        "batch_size=None": (DataLoader(dataset, batch_size=None), r"batch_size=None"),
        "replacement": (DataLoader(dataset, sampler=RandomSampler(dataset, replacement=True)), r"replacement"),
        "num_samples": (DataLoader(dataset, sampler=RandomSampler(dataset, num_samples=4)), r"num_samples"),
        "subset": (DataLoader(dataset, sampler=SubsetRandomSampler(range(4))), r"SubsetRandomSampler"),
        "own batch sampler": (DataLoader(dataset, batch_sampler=OwnBatches()), r"OwnBatches"),
        "grouped over a subset": (DataLoader(dataset, batch_sampler=GroupedBatchSampler(
            SubsetRandomSampler(range(4)), [0] * 10, 2)), r"SubsetRandomSampler"),
        "batch sampler with replacement": (DataLoader(dataset, batch_sampler=BatchSampler(
            RandomSampler(dataset, replacement=True), 2, False)), r"replacement"),
    }


@pytest.mark.parametrize("case", list(_unwrappable()))
def test_wrap_refuses_what_it_cannot_reproduce_and_says_what_to_pass_instead(case):
    dl, named = _unwrappable()[case]
    with pytest.raises(ValueError) as refused:
        AdaptiveLoader.wrap(dl)
    message = str(refused.value)
    assert re.search(named, message), message
    assert re.search(r"\b(use|pass|build|give)\b", message, re.IGNORECASE), f"no alternative named: {message}"

"""options: DataLoader-like arguments checked at construction, as DataLoader checks them."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from adaptive_loader import _torch
from adaptive_loader.options import SEED_RANGE, check_dataloader_options, shuffle_seed, warn_worker_number

CPUS = len(os.sched_getaffinity(0))

# what DataLoader itself refuses at construction, in its own words: ours start with them
REFUSED_IN_DATALOADERS_WORDS = [
    dict(num_workers=-1),
    dict(timeout=-1),
    dict(timeout=-0.5),
    dict(num_workers=0, prefetch_factor=2),
    dict(num_workers=2, prefetch_factor=-1),
    dict(num_workers=0, persistent_workers=True),
    dict(num_workers=2, multiprocessing_context="bogus"),
    dict(num_workers=2, multiprocessing_context=object()),
    dict(num_workers=0, multiprocessing_context="spawn"),
]
# ... and all it refuses (a str num_workers or timeout with Python's own TypeError): ours must raise the same type
SHARED_REFUSALS = REFUSED_IN_DATALOADERS_WORDS + [dict(num_workers="2"), dict(timeout="1")]


@pytest.mark.parametrize("kwargs", SHARED_REFUSALS, ids=lambda k: ",".join(f"{a}={v!r}" for a, v in k.items()))
def test_refuses_what_dataloader_refuses_with_the_same_exception_type(kwargs):
    with pytest.raises((TypeError, ValueError)) as theirs:
        DataLoader(list(range(4)), **kwargs)
    with pytest.raises(theirs.type):
        check_dataloader_options(**kwargs)


@pytest.mark.parametrize("kwargs", REFUSED_IN_DATALOADERS_WORDS,
                         ids=lambda k: ",".join(f"{a}={v!r}" for a, v in k.items()))
def test_the_message_starts_with_dataloaders_own_words(kwargs):
    # code and tests written against DataLoader match on its words; ours go on to say what to pass
    with pytest.raises((TypeError, ValueError)) as theirs:
        DataLoader(list(range(4)), **kwargs)
    with pytest.raises(theirs.type) as ours:
        check_dataloader_options(**kwargs)
    assert str(ours.value).startswith(str(theirs.value)), (str(ours.value), str(theirs.value))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_workers=-1), ValueError, "num_workers must be an int >= 0"),
    (dict(num_workers=1.5), TypeError, "num_workers must be an int >= 0.*float"),
    (dict(num_workers=True), TypeError, "num_workers must be an int"),
    (dict(timeout=-1), ValueError, "timeout must be a number >= 0"),
    (dict(timeout=float("nan")), ValueError, "timeout must be a number >= 0.*nan"),
    (dict(timeout=float("inf")), ValueError, "timeout must be a number >= 0.*0: no timeout"),
    (dict(timeout="1"), TypeError, "timeout must be a number"),
    (dict(timeout=True), TypeError, "timeout must be a number"),
    (dict(prefetch_factor=2), ValueError, "prefetch_factor=2 needs num_workers > 0"),
    (dict(num_workers=1, prefetch_factor=0), ValueError, "prefetch_factor must be an int >= 1"),
    (dict(num_workers=1, prefetch_factor=2.0), TypeError, "prefetch_factor must be an int"),
    (dict(persistent_workers=True), ValueError, "needs num_workers > 0. persistent_workers=True keeps the worker"),
    (dict(num_workers=1, persistent_workers="yes"), TypeError, "persistent_workers must be True or False"),
    (dict(pin_memory=1), TypeError, "pin_memory must be True or False"),
    (dict(num_workers=1, multiprocessing_context="bogus"), ValueError, "start method in .*'bogus'"),
    (dict(num_workers=1, multiprocessing_context=3), TypeError, "should be a valid context.*type int: pass a start"),
    (dict(multiprocessing_context="fork"), ValueError, "num_workers > 0"),
    (dict(seed=-1), ValueError, r"0 <= seed < 2\*\*64, got -1"),
    (dict(seed=2**64), ValueError, r"0 <= seed < 2\*\*64"),
    (dict(seed=1.0), TypeError, "seed must be an int.*float"),
    (dict(seed="7"), TypeError, "seed must be an int"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(generator=7), TypeError, "generator must be a torch.Generator"),
    (dict(generator=np.random.default_rng(0)), TypeError, "generator must be a torch.Generator"),
    (dict(worker_init_fn="init"), TypeError, "worker_init_fn must be callable"),
    (dict(pin_memory_device=0), TypeError, "pin_memory_device must be a device string"),
    (dict(pin_memory_device="nodevice"), ValueError, "pin_memory_device 'nodevice' is not a device"),
    (dict(in_order=False), ValueError, "in_order=False is not supported"),
    (dict(in_order=0), TypeError, "in_order must be True or False"),
])
def test_each_bad_argument_gets_a_precise_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        check_dataloader_options(**kwargs)


def test_unknown_arguments_are_a_type_error():
    with pytest.raises(TypeError, match="pin_memroy"):
        check_dataloader_options(pin_memroy=True)


def test_defaults_normalize_as_dataloader_does():
    assert check_dataloader_options() == dict(
        num_workers=0, prefetch_factor=None, persistent_workers=False, pin_memory=False, timeout=0.0,
        worker_init_fn=None, multiprocessing_context=None, generator=None, seed=None, pin_memory_device="",
        in_order=True)
    options = check_dataloader_options(num_workers=2)
    dl = DataLoader(list(range(4)), num_workers=2)
    assert options["prefetch_factor"] == dl.prefetch_factor == 2
    assert check_dataloader_options(num_workers=2, prefetch_factor=5)["prefetch_factor"] == 5
    assert check_dataloader_options(num_workers=np.int64(3))["num_workers"] == 3
    assert type(check_dataloader_options(timeout=2)["timeout"]) is float


def test_good_values_pass_through():
    init = lambda worker_id: None  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    context = multiprocessing.get_context("spawn")
    options = check_dataloader_options(num_workers=1, worker_init_fn=init, generator=generator,
                                       multiprocessing_context=context, seed=2**64 - 1, pin_memory=np.bool_(True),
                                       persistent_workers=True, timeout=1.5, pin_memory_device="cuda")
    assert options["worker_init_fn"] is init and options["generator"] is generator
    assert options["multiprocessing_context"] is context
    assert options["seed"] == 2**64 - 1 and options["pin_memory"] is True and options["timeout"] == 1.5
    assert options["pin_memory_device"] == "cuda"
    assert SEED_RANGE == (0, 2**64)


@pytest.mark.parametrize("method", multiprocessing.get_all_start_methods())
def test_a_start_method_becomes_its_context_as_in_dataloader(method):
    ours = check_dataloader_options(num_workers=1, multiprocessing_context=method)["multiprocessing_context"]
    theirs = DataLoader(list(range(4)), num_workers=1, multiprocessing_context=method).multiprocessing_context
    assert isinstance(ours, multiprocessing.context.BaseContext)
    assert ours.get_start_method() == theirs.get_start_method() == method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA generator needs a GPU")
def test_a_cuda_generator_is_refused():
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        check_dataloader_options(generator=torch.Generator(device="cuda"))


def test_an_explicit_seed_wins_and_leaves_the_generator_alone():
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert shuffle_seed(11, generator) == 11
    assert torch.equal(generator.get_state(), state)


def test_the_seed_comes_from_the_generator_like_random_sampler_draws_it():
    seeds = [shuffle_seed(None, torch.Generator().manual_seed(5)) for _ in range(2)]
    expected = int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(5)).item())
    assert seeds == [expected, expected]
    assert shuffle_seed(None, torch.Generator().manual_seed(6)) != expected
    generator = torch.Generator().manual_seed(5)
    assert shuffle_seed(None, generator) != shuffle_seed(None, generator)  # each draw advances it
    assert 0 <= expected < 2**63


def test_without_seed_or_generator_torch_manual_seed_decides():
    torch.manual_seed(1)
    first = shuffle_seed(None, None)
    torch.manual_seed(1)
    again = shuffle_seed(None, None)
    torch.manual_seed(2)
    other = shuffle_seed(None, None)
    assert first == again != other


def test_shuffle_seed_checks_its_arguments():
    with pytest.raises(ValueError, match="seed"):
        shuffle_seed(-3, None)
    with pytest.raises(TypeError, match="generator"):
        shuffle_seed(None, 42)


def _worker_warnings(caught):
    return [w for w in caught if "excessive worker creation" in str(w.message)]


def test_the_worker_warning_is_torchs_own_text_once():
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        DataLoader(list(range(4)), num_workers=CPUS + 1)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        assert warn_worker_number(CPUS + 1, stacklevel=1) is True
    assert len(_worker_warnings(theirs)) == len(_worker_warnings(ours)) == 1
    assert str(ours[0].message) == str(theirs[0].message)
    assert ours[0].category is UserWarning
    assert ours[0].filename == __file__  # points at the caller, not at this package or torch


@pytest.mark.parametrize("workers", [0, 1, CPUS])
def test_no_worker_warning_within_the_cpus(workers):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_worker_number(workers) is False
        DataLoader(list(range(4)), num_workers=workers)  # nor does torch warn


def test_the_inner_dataloaders_warning_can_be_silenced_and_nothing_else():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _torch.quiet_worker_number_warning():
            DataLoader(list(range(4)), num_workers=CPUS + 1)
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]

"""Streams (IterableDataset): every sample once with its content, batches made in the workers under the
budget in force, a real SIGKILL survived, resumption in a new process, DataLoader's behaviour."""

import io
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from adaptive_loader import AdaptiveLoader, StreamLoader
from stream_data import (CountingStream, UnseededStream, check_counting_sample, counting_keys, list_collate)
from stress.workloads import kill_one_worker

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


class StatefulStream(CountingStream):
    """CountingStream with the Stateful protocol: its state is how far the worker's keys were read."""

    def __init__(self, n, **kwargs):
        super().__init__(n, **kwargs)
        self.start = self.read = 0

    def state_dict(self):
        return {"read": self.read}

    def load_state_dict(self, state):
        self.start = state["read"]

    def __iter__(self):
        keys = self.keys()
        self.read = self.start
        while self.read < len(keys):
            self.read += 1
            yield self.sample(keys[self.read - 1])


def cost(sample):
    return CountingStream.cost(sample)


def keys_of(loader, kill_at=None):
    """Every key one epoch delivered, each sample's content checked; SIGKILL a worker at batch ``kill_at``."""
    keys = []
    for step, batch in enumerate(loader):
        keys.extend(check_counting_sample(s) for s in batch)
        if step == kill_at:
            kill_one_worker()
    return keys


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("by_cost", [False, True])
def test_every_sample_once_with_its_content_in_batches_within_the_caps(workers, by_cost):
    loader = AdaptiveLoader(CountingStream(150), costs=cost if by_cost else None, max_cost=200 if by_cost else None,
                            max_batch_size=8, num_workers=workers, collate_fn=list_collate)
    assert isinstance(loader, StreamLoader) and isinstance(loader, AdaptiveLoader)
    for _ in range(2):
        keys, sizes = [], []
        for batch in loader:
            keys.extend(check_counting_sample(s) for s in batch)
            assert len(batch) <= 8
            assert not by_cost or sum(cost(s) for s in batch) <= 200 or len(batch) == 1
            sizes.append(len(batch))
        assert sorted(keys) == list(range(150))
    if not by_cost:  # by count, in stream order, as DataLoader batches: full batches but each worker's last
        assert sizes.count(8) >= len(sizes) - max(workers, 1)
    loader.close()


def test_batches_by_count_are_dataloaders_batches():
    ours = AdaptiveLoader(CountingStream(50), batch_size=4, num_workers=2, collate_fn=list_collate)
    theirs = DataLoader(CountingStream(50), batch_size=4, num_workers=2, collate_fn=list_collate)
    assert [[s["key"] for s in b] for b in ours] == [[s["key"] for s in b] for b in theirs]
    for drop_last in (True, False):
        ours = AdaptiveLoader(CountingStream(50), batch_size=4, num_workers=2, collate_fn=list_collate,
                              drop_last=drop_last)
        theirs = DataLoader(CountingStream(50), batch_size=4, num_workers=2, collate_fn=list_collate,
                            drop_last=drop_last)
        assert [[s["key"] for s in b] for b in ours] == [[s["key"] for s in b] for b in theirs]
        assert len(ours) == len(theirs) if hasattr(CountingStream, "__len__") else True


class SelfBatching(IterableDataset):
    """Yields ready-made batches (as WebDataset's .batched() does)."""

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, 12, workers):
            yield {"x": torch.full((3, 5), float(i)), "i": torch.tensor([i, i, i])}


def test_a_dataset_that_batches_itself_passes_through_as_with_batch_size_none():
    theirs = [b["i"].tolist() for b in DataLoader(SelfBatching(), batch_size=None, num_workers=2)]
    loader = AdaptiveLoader(SelfBatching(), batch_size=None, num_workers=2)
    ours = []
    for batch in loader:
        assert torch.equal(batch["x"], torch.full((3, 5), float(batch["i"][0])))
        ours.append(batch["i"].tolist())
    assert ours == theirs
    wrapped = AdaptiveLoader.wrap(DataLoader(SelfBatching(), batch_size=None, num_workers=2))
    assert [b["i"].tolist() for b in wrapped] == theirs


def test_wrap_keeps_the_streams_batch_size_and_workers():
    dataloader = DataLoader(CountingStream(40), batch_size=8, num_workers=2, collate_fn=list_collate)
    loader = AdaptiveLoader.wrap(dataloader)
    assert isinstance(loader, StreamLoader) and loader.batch_size == 8 and loader.num_workers == 2
    assert sorted(k for b in loader for k in (check_counting_sample(s) for s in b)) == list(range(40))


def record_worker(worker_id):
    info = get_worker_info()
    assert info.id == worker_id and info.num_workers == 2
    os.environ["STREAM_TEST_WORKER"] = str(worker_id)


class SaysWhichWorker(CountingStream):
    def sample(self, key):
        sample = super().sample(key)
        sample["worker"] = int(os.environ.get("STREAM_TEST_WORKER", -1))
        return sample


def test_workers_see_worker_info_and_worker_init_fn_and_persist_across_epochs():
    loader = AdaptiveLoader(SaysWhichWorker(40), batch_size=4, num_workers=2, collate_fn=list_collate,
                            worker_init_fn=record_worker, persistent_workers=True)
    for _ in range(2):
        by_worker = {}
        for batch in loader:
            for s in batch:
                by_worker.setdefault(s["worker"], []).append(s["key"])
        assert by_worker == {w: counting_keys(40, worker=w, num_workers=2) for w in (0, 1)}
    loader.close()


@pytest.mark.parametrize("stream", [CountingStream, StatefulStream], ids=["replayed", "stateful"])
@pytest.mark.parametrize("by_cost", [False, True])
def test_a_worker_killed_mid_epoch_goes_on_from_what_was_delivered(stream, by_cost):
    loader = AdaptiveLoader(stream(300), costs=cost if by_cost else None, max_cost=150 if by_cost else None,
                            max_batch_size=6, num_workers=2, collate_fn=list_collate, window=16)
    keys = keys_of(loader, kill_at=9)
    assert loader.fallbacks.get("recovery") == 1
    assert sorted(keys) == list(range(300)), f"{len(keys)} delivered, {len(set(keys))} distinct"
    assert sorted(keys_of(loader)) == list(range(300))  # and the next epoch is whole
    loader.close()


def test_a_stream_that_is_not_deterministic_is_refused_rather_than_delivered_twice():
    loader = AdaptiveLoader(UnseededStream(400), batch_size=4, num_workers=2, collate_fn=list_collate)
    keys = []
    with pytest.raises(RuntimeError, match="not deterministic"):
        for step, batch in enumerate(loader):
            keys.extend(check_counting_sample(s) for s in batch)
            if step == 5:
                kill_one_worker()
    assert len(keys) == len(set(keys)), "a sample came twice"
    loader.close()


def test_the_budget_reaches_the_workers_mid_stream_and_each_batch_carries_its_version():
    records = []
    loader = AdaptiveLoader(CountingStream(600), costs=cost, max_cost=400, max_batch_size=16, num_workers=2,
                            collate_fn=list_collate, window=8, telemetry=records.append, prefetch_factor=2)
    for step, batch in enumerate(loader):
        check_counting_sample(batch[0])
        if step == 10:
            loader._cap_budget("test", 120)  # a cap from another limit, as the device guard sets one
            lowered = loader.sampler.version
    versions = [r["budget_version"] for r in records if r["kind"] == "batch"]
    for worker in {r["worker"] for r in records if r["kind"] == "batch"}:
        # each worker applies a new version at its next batch; across workers batches interleave
        mine = [r["budget_version"] for r in records if r["kind"] == "batch" and r["worker"] == worker]
        assert mine == sorted(mine), f"worker {worker} went back to an older budget: {mine}"
    assert versions[-1] >= lowered
    late = [r for r in records if r["kind"] == "batch" and r["budget_version"] >= lowered]
    assert len(late) > 10 and all(r["cost"] <= 120 or r["samples"] == 1 for r in late)
    # at most the batches in flight then (2 workers x prefetch 2) were packed under the old budget
    assert versions.index(lowered) <= 11 + 4
    loader.close()


def test_groups_never_mix():
    loader = AdaptiveLoader(CountingStream(200), costs=cost, max_cost=300, max_batch_size=8, num_workers=2,
                            collate_fn=list_collate, group_ids=lambda s: s["key"] % 3)
    keys = []
    for batch in loader:
        assert len({s["key"] % 3 for s in batch}) == 1
        keys.extend(check_counting_sample(s) for s in batch)
    assert sorted(keys) == list(range(200))


RESUME = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}, {repo!r}]
    from adaptive_loader import AdaptiveLoader
    from stream_data import check_counting_sample, list_collate
    from test_streams import StatefulStream, CountingStream, cost
    if __name__ == "__main__":
        loader = AdaptiveLoader({stream}(240), costs=cost, max_cost=160, max_batch_size=6, num_workers=2,
                                collate_fn=list_collate, multiprocessing_context="spawn")
        loader.load_state_dict(torch.load(sys.argv[1], weights_only=False))
        keys = [check_counting_sample(s) for b in loader for s in b]
        print(",".join(map(str, keys)))
""")


@pytest.mark.parametrize("stream", ["CountingStream", "StatefulStream"])
def test_state_dict_resumes_mid_epoch_in_a_new_process(tmp_path, stream):
    loader = AdaptiveLoader(globals()[stream](240), costs=cost, max_cost=160, max_batch_size=6, num_workers=2,
                            collate_fn=list_collate)
    first = []
    for step, batch in enumerate(loader):
        first.extend(check_counting_sample(s) for s in batch)
        if step == 12:
            torch.save(loader.state_dict(), tmp_path / "state.pt")
            break
    loader.close()
    script = tmp_path / "resume.py"
    script.write_text(RESUME.format(tests=TESTS, repo=REPO, stream=stream))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "state.pt")], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    rest = [int(k) for k in out.stdout.strip().split(",") if k]
    assert sorted(first + rest) == list(range(240))


def test_a_streams_state_and_a_map_style_state_do_not_mix():
    stream = AdaptiveLoader(CountingStream(20), batch_size=4, collate_fn=list_collate)
    mapped = AdaptiveLoader(list(range(20)), batch_size=4)
    with pytest.raises(ValueError, match="over a stream"):
        mapped.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="map-style"):
        stream.load_state_dict(mapped.state_dict())
    assert list(mapped)[0].tolist() == [0, 1, 2, 3]  # the refused state left it as it was


def test_min_batch_size_holds_once_the_streams_costs_are_seen():
    loader = AdaptiveLoader(CountingStream(200), costs=cost, max_cost=400, max_batch_size=8, min_batch_size=3,
                            collate_fn=list_collate)
    seen = [cost(s) for s in next(iter(loader))]
    # the controller's floor (which memory decisions never go below): the smallest sample and two average ones
    assert loader.controller.floor_cost == pytest.approx(min(seen) + 2 * sum(seen) / len(seen))
    assert loader.controller.min_cost == min(seen)
    loader.close()


def test_a_state_from_other_workers_is_refused():
    loader = AdaptiveLoader(CountingStream(60), batch_size=4, num_workers=2, collate_fn=list_collate)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    loader.close()
    other = AdaptiveLoader(CountingStream(60), batch_size=4, num_workers=1, collate_fn=list_collate)
    with pytest.raises(ValueError, match="num_workers=2"):
        other.load_state_dict(state)


def test_len_as_dataloaders_for_a_stream():
    class Sized(CountingStream):
        def __len__(self):
            return self.n

    assert len(AdaptiveLoader(Sized(50), batch_size=8)) == len(DataLoader(Sized(50), batch_size=8)) == 7
    assert len(AdaptiveLoader(Sized(50), batch_size=8, drop_last=True)) == 6
    with pytest.raises(TypeError):
        len(AdaptiveLoader(CountingStream(50), batch_size=8))  # no __len__, as DataLoader
    with pytest.raises(TypeError, match="by cost"):
        len(AdaptiveLoader(Sized(50), costs=cost, max_cost=100))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shuffle=True), ValueError, "expected unspecified shuffle option"),
    (dict(costs=[1, 2, 3], max_cost=5), TypeError, "callable on a sample"),
    (dict(group_ids=[0, 1]), TypeError, "callable on a sample"),
    (dict(seed=3), ValueError, "shuffles itself"),
    (dict(uneven="wait"), ValueError, "uneven must be one of"),
    (dict(batch_size=None, max_cost=10, costs=cost), ValueError, "batches itself"),
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(cost="max"), ValueError, "cost must be one of"),
    (dict(drop_last=True, costs=cost, max_cost=100), ValueError, "give max_batch_size"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveLoader(CountingStream(10), **kwargs)


def test_the_step_guard_says_a_stream_cannot_give_samples_back():
    with pytest.raises(TypeError, match="map-style"):
        AdaptiveLoader(CountingStream(10), batch_size=2).guard()


def test_oversized_samples_go_alone_and_are_said_once_per_worker():
    loader = AdaptiveLoader(CountingStream(60), costs=cost, max_cost=50, max_batch_size=8, collate_fn=list_collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    oversized = [b for b in batches if cost(b[0]) > 50]
    assert oversized and all(len(b) == 1 for b in oversized)
    assert sum("goes in a batch of its own" in str(w.message) for w in caught) == 1
    assert sorted(check_counting_sample(s) for b in batches for s in b) == list(range(60))


def test_a_workers_buffer_holds_samples_worth_one_budget_while_memory_holds_the_budget_down():
    """The buffer is memory too: under the user's cap a full window; once the budget is below it, samples
    worth one budget; while probing, one batch's samples."""
    from adaptive_loader.stream import BUFFER_BATCHES, Resume, SharedBudget, StreamBatcher, _WorkerStream

    budget = SharedBudget()
    batcher = StreamBatcher(CountingStream(400), budget, costs=cost, buffer_size=32, user_max_cost=1000.0)
    stream = _WorkerStream(batcher, worker=0, resume=Resume())
    source = iter(batcher.dataset)

    def fill():
        stream.buffer = []
        while stream._wants_more():
            assert stream._read(source)
        return stream.buffer

    budget.publish(1000.0, 8)
    assert len(fill()) == 32  # the user's cap in force: the whole window
    budget.publish(150.0, 8)
    held = fill()
    assert sum(item.cost for item in held[:-1]) < BUFFER_BATCHES * 150 <= sum(item.cost for item in held)
    budget.publish(1000.0, 8, buffer_cap=8)  # probing
    assert len(fill()) == 8


class OneSlowWorker(CountingStream):
    """Worker 0 reads slowly; worker 1 sends its batches at once and its stream ends."""

    def sample(self, key):
        info = get_worker_info()
        if info is not None and info.id == 0:
            time.sleep(0.15)
        return super().sample(key)


def test_a_worker_whose_stream_ended_and_exited_leaves_its_batches_readable():
    """DataLoader stops a worker once its stream ended, while its last batches may still wait in the main
    process for their turn (in order): the fds they carry are fetched on arrival, before it goes."""
    loader = AdaptiveLoader(OneSlowWorker(24), batch_size=4, num_workers=2, collate_fn=list_collate)
    keys = [check_counting_sample(s) for b in loader for s in b]
    assert sorted(keys) == list(range(24)) and loader.fallbacks == {}, loader.fallbacks
    loader.close()

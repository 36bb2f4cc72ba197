"""The stream helpers of tests/stream_data.py, checked with a plain torch DataLoader: every key
arrives exactly once across workers (and ranks), every sample passes its content check, and the
checks do catch a corrupted or mixed-up sample. The behaviours of webdataset and HF datasets that
the module docstring reports are asserted here too, so an upgrade that changes them shows up."""

import copy
import importlib.util
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stream_data import (MAX_OBJECTS, CountingStream, UnseededStream, check_counting_sample, check_detection_sample,
                         check_hf_sample, counting_keys, detection_objects, detection_sample, expected_detection,
                         hf_length, hf_stream, list_collate, load_digests, objects, tuple_collate,
                         webdataset_detection, write_detection_shards)

needs_wds = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None,
                               reason="webdataset is in the dev extra")
needs_hf = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is in the dev extra")

SIZE = (64, 48)  # small images: the tests check plumbing and content, not speed
IMAGES, SHARDS = 48, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("detection"))
    return write_detection_shards(directory, shards=SHARDS, images=IMAGES, size=SIZE)


def all_keys(n):
    return [f"{i:06d}" for i in range(n)]


def load_detection(dataset, num_workers, **kwargs):
    """Every sample a plain DataLoader delivers, batches of 8, tuple(zip(*batch)) collate."""
    loader = DataLoader(dataset, batch_size=8, num_workers=num_workers, collate_fn=tuple_collate, **kwargs)
    samples = []
    for keys, images, targets in loader:
        assert len(keys) == len(images) == len(targets) <= 8
        samples.extend(zip(keys, images, targets))
    return samples


# ------------------------------------------------------------------------------------------------
# WebDataset detection shards

@needs_wds
def test_shards_hold_contiguous_keys_and_digests(shards):
    assert [os.path.basename(p) for p in shards] == [f"shard-{s:06d}.tar" for s in range(SHARDS)]
    names = []
    for path in shards:
        with tarfile.open(path) as tar:
            members = tar.getnames()
        assert len(members) == 2 * IMAGES // SHARDS
        names.extend(members)
    assert names == [f"{k}.{ext}" for k in all_keys(IMAGES) for ext in ("jpg", "json")]
    digests = load_digests(os.path.dirname(shards[0]))
    assert sorted(digests) == all_keys(IMAGES) and load_digests(shards[0]) == digests
    assert digests["000003"] == expected_detection("000003", size=SIZE)  # the file agrees with a recomputation


def test_object_counts_are_uneven_within_bounds():
    counts = np.array([detection_objects(i) for i in range(320)])
    assert counts.min() == 1 and counts.max() == MAX_OBJECTS
    assert (counts == 1).sum() >= 30 and (counts == MAX_OBJECTS).sum() == 8  # many tiny, one maximal per 40
    assert len(set(counts.tolist())) > 60 and counts.std() > 30
    assert [detection_objects(i) for i in range(320)] == counts.tolist()  # deterministic


@needs_wds
@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_every_key_once_with_its_content(shards, num_workers):
    digests = load_digests(shards[0])
    samples = load_detection(webdataset_detection(shards), num_workers)
    keys = [check_detection_sample(sample, digests) for sample in samples]
    assert sorted(keys) == all_keys(IMAGES) and len(keys) == IMAGES
    counts = [objects(sample) for sample in samples]
    assert min(counts) == 1 and max(counts) <= MAX_OBJECTS and len(set(counts)) > 10
    key, image, target = samples[0]
    assert image.shape == (3, SIZE[1], SIZE[0]) and image.dtype == torch.uint8
    assert target["masks"].shape == (objects(samples[0]), SIZE[1], SIZE[0]) and int(target["masks"].max()) == 1
    assert int(target["image_id"]) == int(key)


@needs_wds
def test_workers_split_whole_shards(shards):
    """split_by_worker splits shards: with 2 workers, worker 0 reads shards 0 and 2, worker 1 the others,
    and the DataLoader takes batches from them in turn."""
    samples = load_detection(webdataset_detection(shards), 2)
    per_shard = IMAGES // SHARDS
    first_batches = [int(samples[i][0]) // per_shard for i in (0, 8)]
    assert first_batches == [0, 1]


@needs_wds
def test_brace_url_and_no_masks(shards):
    url = os.path.join(os.path.dirname(shards[0]), f"shard-{{000000..{SHARDS - 1:06d}}}.tar")
    digests = load_digests(shards[0])
    samples = load_detection(webdataset_detection(url, decode_masks=False), 0)
    assert sorted(check_detection_sample(s, digests) for s in samples) == all_keys(IMAGES)
    assert all("masks" not in s[2] and len(s[2]["polygons"]) == objects(s) for s in samples)


@needs_wds
def test_split_by_node_gives_each_rank_its_shards(shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys = [s[0] for s in load_detection(webdataset_detection(shards, decode_masks=False), 0)]
        per_shard = IMAGES // SHARDS
        assert sorted({int(k) // per_shard for k in keys}) == list(range(rank, SHARDS, 2))
        seen += keys
    assert sorted(seen) == all_keys(IMAGES)


@needs_wds
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_more_workers_than_shards(shards):
    """A worker with no shard raises (webdataset's empty_check) unless empty_check=False."""
    two = shards[:2]
    with pytest.raises(ValueError, match="fewer shards than workers"):
        load_detection(webdataset_detection(two, decode_masks=False), 3)
    keys = [s[0] for s in load_detection(webdataset_detection(two, decode_masks=False, empty_check=False), 3)]
    assert sorted(keys) == all_keys(2 * IMAGES // SHARDS)


@needs_wds
def test_detection_check_catches_corruption(shards):
    digests = load_digests(shards[0])
    good = [s for s in webdataset_detection(shards[:1]) if objects(s) > 1][:2]
    assert len(good) == 2
    for sample in good:
        check_detection_sample(sample)  # recomputed from the key, no digests
        check_detection_sample(sample, digests)
    (key, image, target), (other_key, other_image, other_target) = good

    def corrupt(sample):
        with pytest.raises(AssertionError):
            check_detection_sample(sample, digests)

    flipped = target["masks"].clone()
    flipped[0, 0, 0] ^= 1
    corrupt((key, image, {**target, "masks": flipped}))
    corrupt((key, image, {**target, "masks": target["masks"][:-1], "boxes": target["boxes"][:-1],
                          "labels": target["labels"][:-1]}))
    corrupt((key, other_image, target))  # an image delivered with the wrong target
    corrupt((other_key, image, target))  # a sample under the wrong key
    shifted = image.clone()
    shifted[1, 5, 5] += 1
    corrupt((key, shifted, target))
    corrupt((key, image, {**target, "masks": target["masks"].to(torch.int64)}))
    with pytest.raises(AssertionError):
        check_detection_sample(good[0], seed=1)  # another data set's sample with the same key


@needs_wds
def test_detection_samples_and_pipeline_pickle(shards):
    sample = next(iter(webdataset_detection(shards)))
    key, image, target = pickle.loads(pickle.dumps(sample))
    check_detection_sample((key, image, target), load_digests(shards[0]))
    dataset = pickle.loads(pickle.dumps(webdataset_detection(shards)))
    assert next(iter(dataset))[0] == "000000"
    assert detection_sample.__module__ == "stream_data"


# ------------------------------------------------------------------------------------------------
# Hugging Face datasets

@needs_hf
@pytest.mark.parametrize("num_workers", [0, 2])
def test_hf_stream_every_id_once(num_workers):
    dataset = hf_stream(n=200, num_shards=4)
    assert isinstance(dataset, torch.utils.data.IterableDataset) and dataset.num_shards == 4
    loader = DataLoader(dataset, batch_size=8, num_workers=num_workers, collate_fn=list_collate)
    ids = [check_hf_sample(sample) for batch in loader for sample in batch]
    assert sorted(ids) == list(range(200))
    if num_workers == 2:  # worker w reads shards w, w + 2 (50 rows each); batches alternate
        assert ids[:8] == list(range(8)) and ids[8:16] == list(range(50, 58))
    else:
        assert ids == list(range(200))
    assert len({hf_length(i) for i in ids}) == 50


@needs_hf
def test_hf_check_catches_corruption():
    sample = list(hf_stream(n=10, num_shards=1))[3]  # x: 22 values
    check_hf_sample(sample)
    for bad in ({"id": sample["id"], "x": sample["x"][:-1]},
                {"id": sample["id"] + 1, "x": sample["x"]},
                {"id": sample["id"], "x": sample["x"] + 1},
                {"id": sample["id"], "x": sample["x"].float()}):
        with pytest.raises(AssertionError):
            check_hf_sample(bad)


@needs_hf
def test_hf_state_dict_resumes_in_one_process():
    dataset = hf_stream(n=40, num_shards=4)
    seen = []
    for sample in dataset:
        seen.append(check_hf_sample(sample))
        if len(seen) == 13:
            state = dataset.state_dict()
            break
    resumed = hf_stream(n=40, num_shards=4)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert seen + [check_hf_sample(s) for s in resumed] == list(range(40))


class StateProbe(IterableDataset):
    """Yields (id, worker id, the wrapped HF dataset's state_dict() right after that row)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        worker = get_worker_info().id
        for sample in self.inner:
            yield check_hf_sample(sample), worker, copy.deepcopy(self.inner.state_dict())


@needs_hf
def test_hf_state_dict_inside_workers_is_per_worker():
    """In a worker state_dict() follows that worker's own shards; the main process's copy never moves;
    one worker's state loaded in the main process is applied by every worker to its own shards."""
    dataset = hf_stream(n=40, num_shards=4)
    rows = list(DataLoader(StateProbe(dataset), batch_size=None, num_workers=2))
    assert sorted(r[0] for r in rows) == list(range(40))
    assert dataset.state_dict() == hf_stream(n=40, num_shards=4).state_dict()  # still at the start
    worker0 = [r for r in rows if r[1] == 0]
    assert [r[0] for r in worker0] == list(range(10)) + list(range(20, 30))
    state = worker0[4][2]  # after its 5th row (id 4)
    resumed = hf_stream(n=40, num_shards=4)
    resumed.load_state_dict(state)
    ids = sorted(check_hf_sample(s) for s in DataLoader(resumed, batch_size=None, num_workers=2))
    assert ids == list(range(5, 10)) + list(range(15, 40))  # worker 1 skipped 10..14 too


# ------------------------------------------------------------------------------------------------
# plain generator streams

@pytest.mark.parametrize("num_workers", [0, 2])
def test_counting_stream_every_key_once_over_ranks_and_workers(num_workers):
    n, seen = 203, []
    for rank in range(2):
        stream = CountingStream(n, rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=8, num_workers=num_workers, collate_fn=list_collate)
        keys = [check_counting_sample(s) for batch in loader for s in batch]
        assert sorted(keys) == counting_keys(n, rank, 2)
        again = [s["key"] for batch in loader for s in batch]
        assert again == keys  # deterministic: same order every epoch
        if num_workers == 2:  # batch b comes from worker b % 2
            assert keys[:8] == counting_keys(n, rank, 2, 0, 2)[:8]
            assert keys[8:16] == counting_keys(n, rank, 2, 1, 2)[:8]
        seen += keys
    assert sorted(seen) == list(range(n))
    costs = [CountingStream.cost(s) for s in CountingStream(n)]
    assert min(costs) == 1 and max(costs) == 97


def test_unseeded_stream_same_samples_other_order():
    stream = UnseededStream(200)
    first = [check_counting_sample(s) for s in stream]
    second = [check_counting_sample(s) for s in stream]
    assert sorted(first) == sorted(second) == list(range(200)) and first != second
    loader = DataLoader(UnseededStream(60, rank=1, world_size=2), batch_size=8, num_workers=2,
                        collate_fn=list_collate)
    keys = [check_counting_sample(s) for batch in loader for s in batch]
    assert sorted(keys) == counting_keys(60, 1, 2)


def test_counting_check_catches_corruption():
    sample = CountingStream(10).sample(7)
    check_counting_sample(sample)
    for bad in ({"key": 8, "x": sample["x"]}, {"key": 7, "x": sample["x"][:-1]},
                {"key": 7, "x": sample["x"].flip(0)}, {"key": 7, "x": sample["x"].float()}):
        with pytest.raises(AssertionError):
            check_counting_sample(bad)
    with pytest.raises(ValueError):
        CountingStream(10, rank=2, world_size=2)


@needs_wds
def test_spawn_workers(shards):
    """Datasets and samples cross a spawn start (they pickle and stream_data is importable there)."""
    digests = load_digests(shards[0])
    samples = load_detection(webdataset_detection(shards), 2, multiprocessing_context="spawn")
    assert sorted(check_detection_sample(s, digests) for s in samples) == all_keys(IMAGES)
    loader = DataLoader(UnseededStream(50), batch_size=8, num_workers=2, collate_fn=list_collate,
                        multiprocessing_context="spawn")
    assert sorted(check_counting_sample(s) for batch in loader for s in batch) == list(range(50))


@needs_hf
def test_streams_pickle():
    for stream in (CountingStream(5, rank=0, world_size=1), UnseededStream(5), hf_stream(n=5, num_shards=1)):
        copied = pickle.loads(pickle.dumps(stream))
        assert sorted(int(s["key"] if "key" in s else s["id"]) for s in copied) == list(range(5))
    assert check_counting_sample(pickle.loads(pickle.dumps(CountingStream(5).sample(3)))) == 3

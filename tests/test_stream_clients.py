"""Streams from clients we did not write: WebDataset over real tar shards, Hugging Face datasets'
IterableDataset. Every sample once, with its content; a real SIGKILL; a state resumed in a new process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from adaptive_loader import AdaptiveLoader
from stream_data import (check_detection_sample, check_hf_sample, hf_stream, list_collate, load_digests, objects,
                         tuple_collate, webdataset_detection, write_detection_shards)
from stress.workloads import kill_one_worker

wds = pytest.importorskip("webdataset", reason="webdataset is in the dev extra: the WebDataset client tests need it")
datasets = pytest.importorskip("datasets", reason="datasets is in the dev extra: the HF client tests need it")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
IMAGES = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    paths = write_detection_shards(str(directory), shards=8, images=IMAGES, size=(64, 48))
    return paths, load_digests(str(directory))


def detection_keys(loader, digests, kill_at=None, per_batch=None):
    keys = []
    for step, (names, images, targets) in enumerate(loader):
        batch = list(zip(names, images, targets))
        keys.extend(check_detection_sample(s, digests) for s in batch)
        if per_batch is not None:
            per_batch(batch)
        if step == kill_at:
            kill_one_worker()
    return keys


def expected_keys(n=IMAGES):
    return [f"{i:06d}" for i in range(n)]


def test_webdataset_pipeline_by_objects_every_image_once_in_each_epoch(shards):
    paths, digests = shards

    def within_budget(batch):
        assert len(batch) <= 8 and (sum(objects(s) for s in batch) <= 400 or len(batch) == 1)

    loader = AdaptiveLoader(webdataset_detection(paths), costs=objects, max_cost=400, max_batch_size=8,
                            num_workers=2, collate_fn=tuple_collate)
    for _ in range(2):
        assert sorted(detection_keys(loader, digests, per_batch=within_budget)) == expected_keys()
    loader.close()


def test_webdataset_wrapped_dataloader_keeps_its_batches(shards):
    paths, digests = shards
    dataloader = DataLoader(webdataset_detection(paths), batch_size=8, num_workers=2, collate_fn=tuple_collate)
    loader = AdaptiveLoader.wrap(dataloader)
    sizes = []
    keys = detection_keys(loader, digests, per_batch=lambda b: sizes.append(len(b)))
    assert sorted(keys) == expected_keys()
    assert sizes == [len(b[0]) for b in dataloader]
    loader.close()


def test_webdataset_worker_killed_mid_epoch_is_replayed_past_what_was_delivered(shards):
    paths, digests = shards
    loader = AdaptiveLoader(webdataset_detection(paths), costs=objects, max_cost=300, max_batch_size=4,
                            num_workers=2, collate_fn=tuple_collate)
    keys = detection_keys(loader, digests, kill_at=3)
    assert loader.fallbacks.get("recovery") == 1
    assert sorted(keys) == expected_keys()
    loader.close()


def hf_cost(sample):
    return int(sample["x"].numel())


def hf_ids(loader, kill_at=None, stop_at=None):
    ids = []
    for step, batch in enumerate(loader):
        ids.extend(check_hf_sample(s) for s in batch)
        if step == kill_at:
            kill_one_worker()
        if step == stop_at:
            break
    return ids


@pytest.mark.parametrize("by_cost", [False, True])
def test_hf_iterable_dataset_is_restored_from_its_state_after_a_sigkill(by_cost):
    loader = AdaptiveLoader(hf_stream(200, num_shards=4), costs=hf_cost if by_cost else None,
                            max_cost=120 if by_cost else None, max_batch_size=6, num_workers=2,
                            collate_fn=list_collate)
    assert loader.sampler.stateful  # HF's IterableDataset has state_dict()/load_state_dict()
    ids = hf_ids(loader, kill_at=5)
    assert loader.fallbacks.get("recovery") == 1
    assert sorted(ids) == list(range(200))
    assert sorted(hf_ids(loader)) == list(range(200))
    loader.close()


HF_RESUME = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}, {repo!r}]
    from adaptive_loader import AdaptiveLoader
    from stream_data import check_hf_sample, hf_stream, list_collate
    from test_stream_clients import hf_cost
    if __name__ == "__main__":
        loader = AdaptiveLoader(hf_stream(200, num_shards=4), costs=hf_cost, max_cost=120, max_batch_size=6,
                                num_workers=2, collate_fn=list_collate)
        loader.load_state_dict(torch.load(sys.argv[1], weights_only=False))
        print(",".join(str(check_hf_sample(s)) for b in loader for s in b))
""")


def test_hf_state_dict_resumes_mid_epoch_in_a_new_process(tmp_path):
    loader = AdaptiveLoader(hf_stream(200, num_shards=4), costs=hf_cost, max_cost=120, max_batch_size=6,
                            num_workers=2, collate_fn=list_collate)
    first = hf_ids(loader, stop_at=9)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    loader.close()
    script = tmp_path / "resume.py"
    script.write_text(HF_RESUME.format(tests=TESTS, repo=REPO))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "state.pt")], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    rest = [int(i) for i in out.stdout.strip().split(",") if i]
    assert sorted(first + rest) == list(range(200))

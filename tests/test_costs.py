"""Costs from what users have: callables, Subset/ConcatDataset, COCO files; aspect-ratio groups."""

import bisect
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import ConcatDataset, Dataset, Subset

from adaptive_loader.costs import as_cost_array, as_group_array, aspect_ratio_groups, coco_costs


class Sized(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_a_callable_is_asked_once_per_index():
    asked = []

    def cost(i):
        asked.append(i)
        return [3, 1.5, np.int64(4), torch.tensor(2)][i]

    assert list(as_cost_array(cost, dataset=Sized(4))) == [3, 1.5, 4, 2]
    assert asked == [0, 1, 2, 3]
    assert list(as_cost_array(lambda i: i * 2, expected_len=3)) == [0, 2, 4]


@pytest.mark.parametrize("cost, kwargs, exc, match", [
    (lambda i: "3", dict(expected_len=2), TypeError, r"costs\(0\) returned str, not a number"),
    (lambda i: [1, True][i], dict(expected_len=2), TypeError, r"costs\(1\) returned bool"),
    (lambda i: None, dict(expected_len=1), TypeError, r"costs\(0\) returned NoneType"),
    (lambda i: -1 if i == 2 else 1, dict(expected_len=3), ValueError, r"costs\[2\] = -1"),
    (lambda i: float("nan"), dict(expected_len=1), ValueError, r"costs\[0\] = nan"),
    (lambda i: 1, dict(), ValueError, "a callable costs needs the number of samples"),
])
def test_a_callable_returning_non_numbers_is_refused(cost, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        as_cost_array(cost, **kwargs)


def test_costs_for_the_base_dataset_follow_a_subset_and_nested_subsets():
    base = Sized(10)
    costs = np.arange(10) * 10.0
    inner = Subset(base, [9, 2, 5, 7])
    assert list(as_cost_array(costs, dataset=inner)) == [90, 20, 50, 70]
    assert list(as_cost_array(costs, dataset=Subset(inner, [3, 0]))) == [70, 90]
    assert list(as_cost_array(costs, dataset=Subset(base, torch.tensor([1, 1, 4])))) == [10, 10, 40]
    # the Subset's own length wins: these are per-index costs of the Subset
    assert list(as_cost_array([1, 2, 3, 4], dataset=inner)) == [1, 2, 3, 4]


def test_costs_follow_a_concat_dataset_of_subsets_of_one_base_or_of_several_bases():
    a, b = Sized(5), Sized(3)
    one_base = ConcatDataset([Subset(a, [4, 0]), Subset(a, [2])])
    assert list(as_cost_array([0, 1, 2, 3, 4], dataset=one_base)) == [4, 0, 2]
    two_bases = ConcatDataset([Subset(a, [1, 3]), Subset(b, [2, 0])])
    costs = [10, 11, 12, 13, 14, 20, 21, 22]  # a's costs, then b's
    assert list(as_cost_array(costs, dataset=two_bases)) == [11, 13, 22, 20]
    assert list(as_cost_array(costs, dataset=Subset(two_bases, [3, 0]))) == [20, 11]
    assert list(as_cost_array(costs, dataset=ConcatDataset([a, b]))) == costs  # its own length


def test_group_ids_follow_a_subset_too():
    groups = as_group_array([0, 1, 2, 0, 1], dataset=Subset(Sized(5), [4, 3]))
    assert list(groups) == [1, 0] and groups.dtype == np.int64 and not groups.flags.writeable


def test_a_length_that_fits_nothing_says_which_lengths_were_seen():
    nested = Subset(ConcatDataset([Subset(Sized(10), [1, 2, 3]), Sized(20)]), [0, 1])
    with pytest.raises(ValueError, match=r"costs has 7 entries but the dataset has 2 samples; lengths seen "
                                         r"through Subset/ConcatDataset: \[2, 23, 3, 10, 20, 30\]"):
        as_cost_array(np.ones(7), dataset=nested)
    with pytest.raises(ValueError, match=r"group_ids has 4 entries but the dataset has 3 samples"):
        as_group_array([0, 1, 2, 3], expected_len=3)
    with pytest.raises(ValueError, match="expected_len 4 but the dataset has 3"):
        as_cost_array([1, 2, 3], expected_len=4, dataset=Sized(3))


def test_a_subset_with_indices_outside_its_dataset_is_refused():
    with pytest.raises(ValueError, match="a Subset has indices outside its dataset of 5 samples"):
        as_cost_array(np.ones(5), dataset=Subset(Sized(5), [0, 5]))


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), max_size=50), k=st.integers(0, 5))
def test_aspect_ratio_groups_match_torchvisions_binning(sizes, k):
    # torchvision references/detection/group_by_aspect_ratio.py: bisect_right over 2 ** linspace(-1, 1, 2k + 1)
    bins = sorted((2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0])
    expected = [bisect.bisect_right(bins, float(w) / float(h)) for w, h in sizes]
    assert aspect_ratio_groups(sizes, k=k).tolist() == expected


def test_aspect_ratio_groups_of_typical_shapes():
    groups = aspect_ratio_groups([(640, 480), (480, 640), (500, 500), (1000, 250), (100, 400)])
    assert groups.tolist() == [5, 2, 4, 7, 0]  # 8 groups for k=3: 0 the tallest, 7 the widest
    assert aspect_ratio_groups(np.zeros((0, 2))).tolist() == []


@pytest.mark.parametrize("sizes, k, exc, match", [
    ([(640, 0)], 3, ValueError, r"sizes\[0\] = \[640, 0\]"),
    ([(640, 480), (-1, 2)], 3, ValueError, r"sizes\[1\] = \[-1, 2\]"),
    ([(1.0, float("nan"))], 3, ValueError, "positive and finite"),
    ([640, 480], 3, ValueError, r"shape \(images, 2\).*got shape \(2,\)"),
    ([("a", "b")], 3, TypeError, "sizes must be numeric"),
    ([(640, 480)], -1, ValueError, "k must be >= 0"),
    ([(640, 480)], 1.5, TypeError, "k must be an int"),
])
def test_bad_sizes_are_refused(sizes, k, exc, match):
    with pytest.raises(exc, match=match):
        aspect_ratio_groups(sizes, k=k)


def coco_dict():
    return {
        "images": [{"id": 7, "width": 640, "height": 480}, {"id": 3, "width": 300, "height": 600},
                   {"id": 9, "width": 500, "height": 500}],
        "annotations": [{"id": 1, "image_id": 3, "iscrowd": 0}, {"id": 2, "image_id": 7, "iscrowd": 0},
                        {"id": 3, "image_id": 3, "iscrowd": 1}, {"id": 4, "image_id": 3, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }


def test_coco_costs_count_objects_per_image_in_file_order_or_given_order(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_dict()))
    for source in (coco_dict(), str(path), path):
        assert coco_costs(source).tolist() == [1, 3, 0]
    assert coco_costs(coco_dict(), image_ids=[9, 3]).tolist() == [0, 3]
    assert coco_costs(coco_dict(), image_ids=np.array([3])).tolist() == [3]
    assert coco_costs(coco_dict(), skip_crowd=True).tolist() == [1, 2, 0]
    costs, sizes = coco_costs(coco_dict(), return_sizes=True)
    assert costs.tolist() == [1, 3, 0] and sizes.tolist() == [[640, 480], [300, 600], [500, 500]]
    assert aspect_ratio_groups(sizes).tolist() == [5, 1, 4]


def test_coco_costs_agree_with_pycocotools_when_it_is_there(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco", reason="pycocotools is optional: the cross-check needs it")
    data = coco_dict()
    for a in data["annotations"]:
        a.update(category_id=1, bbox=[0, 0, 1, 1], area=1, segmentation=[[0, 0, 1, 0, 1, 1]])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    coco = coco_api.COCO(os.fspath(path))
    ids = sorted(coco.getImgIds())
    assert coco_costs(str(path), image_ids=ids).tolist() == [len(coco.getAnnIds(imgIds=[i])) for i in ids]


@pytest.mark.parametrize("mutate, kwargs, exc, match", [
    (lambda d: d["annotations"].append({"id": 5, "image_id": 42}), {}, ValueError,
     r"annotations\[4\] is for image_id 42, which is not in 'images'"),
    (lambda d: d["images"].append({"id": 7}), {}, ValueError, "image id 7 appears twice"),
    (lambda d: d["images"].append({"file_name": "x.jpg"}), {}, ValueError, r"images\[3\] has no 'id'"),
    (lambda d: d["annotations"].append({"id": 5}), {}, ValueError, r"annotations\[4\] has no 'image_id'"),
    (lambda d: d.pop("annotations"), {}, ValueError, "no 'annotations' list"),
    (lambda d: d.pop("images"), {}, ValueError, "no 'images' list: give image_ids"),
    (lambda d: None, dict(image_ids=[3, 4, 5]), ValueError, r"image_ids not in the file's images: \[4, 5\]"),
    (lambda d: d["images"][0].pop("width"), dict(return_sizes=True), ValueError, "image 7 has no width/height"),
])
def test_bad_coco_data_is_refused_precisely(mutate, kwargs, exc, match):
    data = coco_dict()
    mutate(data)
    with pytest.raises(exc, match=match):
        coco_costs(data, **kwargs)


def test_coco_costs_without_images_need_image_ids_and_not_a_list():
    data = coco_dict()
    data.pop("images")
    assert coco_costs(data, image_ids=[3, 7, 8]).tolist() == [3, 1, 0]
    with pytest.raises(TypeError, match="annotations must be a COCO dict or a path"):
        coco_costs([1, 2])

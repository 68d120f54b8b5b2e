"""secsweep.data: class names, image-text pairs (PairedSet, caption_pairs) and unlabelled views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secsweep import data
from secsweep.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "test")  # 360 real images, scikit-learn ships them


# ----------------------------------------------------------------------------- class names


@pytest.mark.parametrize("name", data.DATASETS)
def test_class_names_cover_every_class(name):
    names = data.class_names(name)
    assert len(names) == data.num_classes(name)
    assert len(set(names)) == len(names) and all(isinstance(n, str) and n.strip() == n != "" for n in names)


def test_class_names_match_the_datasets_label_order():
    assert data.class_names("fashion_mnist")[0] == "T-shirt/top" and data.class_names("fashion_mnist")[9] == "Ankle boot"
    assert data.class_names("mnist")[7] == data.class_names("svhn")[7] == data.class_names("digits")[7] == "seven"
    assert data.class_names("cifar10")[1] == "automobile" and data.class_names("cifar10")[9] == "truck"
    assert data.class_names("stl10")[2] == "car" and data.class_names("stl10")[7] == "monkey"
    gtsrb = data.class_names("gtsrb")
    assert (gtsrb[0], gtsrb[13], gtsrb[14], gtsrb[42]) == (
        "Speed limit (20km/h)", "Yield", "Stop", "End of no passing by vehicles over 3.5 metric tons")
    fine = data.class_names("cifar100")
    assert fine[0] == "apple" and fine[99] == "worm" and fine[1] == "aquarium fish"
    # CIFAR-100's meta file lists the fine labels alphabetically (with '_' where these have ' ')
    assert [n.replace(" ", "_") for n in fine] == sorted(n.replace(" ", "_") for n in fine)


def test_class_names_of_an_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset='imagenet'"):
        data.class_names("imagenet")


# ----------------------------------------------------------------------------- caption pairs


def test_caption_pairs_name_the_right_class_with_seeded_templates(digits):
    pairs = data.caption_pairs(digits, seed=3)
    assert len(pairs) == len(digits) and pairs.shape == (1, 8, 8) and pairs.name == "digits"
    assert pairs.images is digits.images and torch.equal(pairs.labels, digits.labels)  # shared, not copied
    names = data.class_names("digits")
    used = set()
    for text, label in zip(pairs.texts, digits.labels.tolist()):
        matches = [t for t in data.DEFAULT_TEMPLATES if t.format(names[label]) == text]
        assert matches, text  # one of the templates, filled with this image's class name
        used.add(matches[0])
    assert used == set(data.DEFAULT_TEMPLATES)  # 360 draws use every template
    assert data.caption_pairs(digits, seed=3).texts == pairs.texts  # deterministic
    assert data.caption_pairs(digits, seed=4).texts != pairs.texts  # the seed picks the templates


def test_caption_pairs_custom_templates_and_names():
    ds = data.ImageSet(torch.zeros(3, 3, 4, 4), torch.tensor([1, 0, 1]), 2, "my_set")
    pairs = data.caption_pairs(ds, templates=("an image of {}",), names=("cats", "dogs"))
    assert pairs.texts == ("an image of dogs", "an image of cats", "an image of dogs")
    with pytest.raises(ConfigError):  # not a dataset of `load`, and no names given
        data.caption_pairs(ds)
    for bad in ((), ("no placeholder",), ("two {} {}",)):
        with pytest.raises(ValueError, match="templates"):
            data.caption_pairs(ds, templates=bad, names=("cats", "dogs"))
    with pytest.raises(ValueError, match="labels"):
        data.caption_pairs(ds, names=("cats",))  # label 1 has no name


def test_caption_pairs_refuse_an_unlabelled_view(digits):
    with pytest.raises(ValueError, match="unlabelled"):
        data.caption_pairs(digits.unlabelled())


def test_paired_set_subset_and_validation(digits):
    pairs = data.caption_pairs(digits)
    sub = pairs.subset(torch.tensor([4, 0, 2]))
    assert len(sub) == 3 and sub.texts == (pairs.texts[4], pairs.texts[0], pairs.texts[2])
    assert torch.equal(sub.images, digits.images[[4, 0, 2]]) and sub.labels.tolist() == digits.labels[[4, 0, 2]].tolist()
    mask = digits.labels == 5
    five = pairs.subset(mask)
    assert len(five) == int(mask.sum()) and all("five" in t for t in five.texts)
    unlabelled = data.PairedSet(torch.zeros(2, 1, 8, 8), ("a", "b"))
    assert unlabelled.labels is None and unlabelled.subset(torch.tensor([True, False])).texts == ("a",)
    with pytest.raises(ValueError, match="texts"):
        data.PairedSet(torch.zeros(2, 1, 8, 8), ("only one",))
    with pytest.raises(ValueError, match="texts"):
        data.PairedSet(torch.zeros(2, 1, 8, 8), ["a", "b"])  # a list could change under the frozen set
    with pytest.raises(ValueError, match="labels.shape"):
        data.PairedSet(torch.zeros(2, 1, 8, 8), ("a", "b"), torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- unlabelled view, source


def test_unlabelled_view_shares_images_and_hides_labels(digits):
    view = digits.unlabelled()
    assert len(view) == len(digits) and view.images is digits.images and view.num_classes == 10
    assert view.labels.dtype == torch.int64 and bool((view.labels == data.UNLABELLED).all())
    assert not view.labelled and digits.labelled and set(digits.labels.tolist()) == set(range(10))  # original kept
    part = view.subset(torch.arange(5))
    assert not part.labelled and part.source == view.source == "sklearn"
    # a consumer that trains on the labels of an unlabelled view fails instead of learning class -1
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(torch.zeros(len(view), 10), view.labels)
    with pytest.raises(RuntimeError):
        torch.bincount(view.labels)

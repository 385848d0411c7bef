"""Model specs (preprocessing, class names, the shipped model's hash), --weights messages and
the naming of folder classes, checked against independent computations."""

import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from nchains._util.io import hash_model
from nchains.models import zoo
from nchains.models.class_names import chain_region, label_agreement, name_classes
from nchains.models.images import describe_preprocessing, load_image_folder
from nchains.models.spec import (load_model, parse_model_spec, spec_class_names, spec_of_model_hash,
                                 spec_preprocessing)
from nchains.models.weights import describe_mismatch, load_state_dict_file


def test_spec_preprocessing_follows_the_model():
    assert spec_preprocessing({"kind": "default"}) == {"preprocessing": "fashion-mnist", "size": 28,
                                                       "grayscale": True}
    tv = parse_model_spec("torchvision:resnet18", None)
    assert spec_preprocessing(tv) == {"preprocessing": "imagenet", "size": 224, "grayscale": False}
    assert spec_preprocessing(tv, in_channels=1)["grayscale"] is True


def test_spec_class_names():
    assert spec_class_names({"kind": "default"}, 10) == list(zoo.FASHION_CLASSES)
    names = spec_class_names({"kind": "torchvision", "name": "vgg11"}, 1000)
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet tissue"
    assert spec_class_names({"kind": "torchvision", "name": "resnet18"}, 3) is None
    assert spec_class_names({"kind": "file", "path": "m.pt2"}, 1000) is None


def test_shipped_model_hash_is_recognised():
    assert spec_of_model_hash(hash_model(zoo.default_model())) == {"kind": "default"}
    assert spec_of_model_hash(hash_model(zoo.fashion_resnet())) is None


@pytest.mark.parametrize("value", [-3, 0, 2_000_000, True])
def test_num_classes_range(value):
    with pytest.raises(ValueError, match="--num-classes must be an integer between 1 and 1000000"):
        load_model({"kind": "torchvision", "name": "resnet18", "num_classes": value})


def test_fashion_preprocessing_of_28x28_pngs_is_the_shipped_normalisation(tmp_path):
    images, _, _ = zoo.fashion_sample()
    for i in range(4):
        Image.fromarray(images[i].numpy()).save(tmp_path / f"{i}.png")
    x, _, _, _ = load_image_folder(tmp_path, size=28, preprocessing="fashion-mnist", grayscale=True)
    assert torch.equal(x, zoo.normalize_fashion(images[:4]).unsqueeze(1))


def test_fashion_preprocessing_resizes_and_crops_larger_images(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (56, 84), dtype=np.uint8)  # H x W: shorter side 56 -> 28, width 42 -> crop 28
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, _, _, _ = load_image_folder(tmp_path, size=28, preprocessing="fashion-mnist", grayscale=True)
    from torchvision.transforms.v2 import functional as TF

    ref = TF.center_crop(TF.resize(torch.from_numpy(arr)[None], [28], antialias=True), [28, 28])
    assert torch.allclose(x[0], (ref.float() / 255 - zoo.FASHION_MEAN) / zoo.FASHION_STD, atol=1e-6)


def test_describe_preprocessing_states_the_formula():
    d = describe_preprocessing("imagenet", 224, False)
    assert d["resize"].startswith("shorter side to 256") and "crop 224x224" in d["resize"]
    assert d["mean"] == [0.485, 0.456, 0.406] and d["formula"] == "x = (p / 255 - mean) / std"
    assert describe_preprocessing("none", 32, True)["formula"] == "x = p / 255"
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        describe_preprocessing("bogus", 32, True)


def test_describe_mismatch_counts_keys_like_load_state_dict():
    model = torchvision.models.resnet18(num_classes=5)
    state = torchvision.models.resnet34(num_classes=3).state_dict()
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    text = describe_mismatch(model, state)
    unexpected = [k for k in state if k not in model.state_dict()]
    assert f"{len(unexpected)} unexpected keys ({unexpected[0]}" in text
    assert "2 size mismatches (fc.weight (file [3, 512], model [5, 512])" in text
    assert unexpected[0] in str(info.value)  # torch agrees on which keys are unexpected
    assert describe_mismatch(model, model.state_dict()) == ""


def test_weights_file_messages_never_advise_weights_only_false(tmp_path):
    (tmp_path / "a.pt").write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(ValueError) as info:
        load_state_dict_file(str(tmp_path / "a.pt"))
    assert "the Python object print," in str(info.value) and "weights_only" not in str(info.value)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "b.pt")  # Lightning-style wrapper
    assert torch.equal(load_state_dict_file(str(tmp_path / "b.pt"))["w"], torch.ones(2))


def test_name_classes():
    names = list(zoo.FASHION_CLASSES)
    got = name_classes(["Ankle boot", "sneaker"], names, 10, default_model=True)
    assert got == (names, [9, 7], "model")
    assert name_classes(["ankle_boot", "T-shirt/top"], names, 10, default_model=True).output_of == [9, 0]
    assert name_classes(["cats", "sneaker"], names, 10, default_model=True).how == "model-unmatched"
    assert name_classes(["a", "b", "c"], None, 3) == (["a", "b", "c"], [0, 1, 2], "folders")
    assert name_classes(["a", "b"], None, 3) == (None, None, "none")
    assert name_classes(None, None, 3) == (None, None, "none")


def test_label_agreement_and_region():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 1])  # folder classes 0, 1 are outputs 1, 0
    assert label_agreement(logits, labels, [1, 0]) == pytest.approx(2 / 3)
    region = chain_region([7, 9], list(zoo.FASHION_CLASSES))
    assert region["names"] == ["sneaker", "ankle-boot"] and "sneaker, ankle-boot" in region["note"]
    assert chain_region([2], None)["names"] == ["2"]

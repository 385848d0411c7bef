"""``nchains extract --images DIR`` with the shipped model: the model's own preprocessing, its
class names, warnings when the folder and the model disagree, and a manifest that states what
the chain's images went through and which region the chain is for."""

import json

import numpy as np
import torch
from PIL import Image

from nchains import Chain, cli
from nchains._util.io import hash_tensor
from nchains.models import zoo

_FAST = ["--steps", "2", "--no-finetune", "--quiet"]


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sample_folder(root, folders, per_class=3):
    """Class sub-folders of shipped Fashion-MNIST PNGs: ``folders`` maps a folder name to the class
    whose images it holds. Returns the model inputs those images are (normalised, folder order)."""
    images, labels, _ = zoo.fashion_sample()
    expected = []
    for name in sorted(folders):
        rows = torch.nonzero(labels == zoo.FASHION_CLASSES.index(folders[name])).flatten()[:per_class]
        (root / name).mkdir(parents=True)
        for k, r in enumerate(rows.tolist()):
            Image.fromarray(images[r].numpy()).save(root / name / f"{k}.png")
        expected.append(zoo.normalize_fashion(images[rows]).unsqueeze(1))
    return torch.cat(expected)


def test_default_model_on_its_own_kind_of_images(tmp_path, capsys):
    folder = tmp_path / "shoes"
    expected = _sample_folder(folder, {"sneaker": "sneaker", "ankle-boot": "ankle-boot"})
    chain_path = tmp_path / "c.json"
    code, _, err = _run(capsys, "extract", "--images", folder, *_FAST, "--out", chain_path)
    assert code == 0, err
    assert "warning" not in err
    chain = Chain.load(chain_path)
    # the shipped model's preprocessing: the PNGs give exactly its normalised 28x28 inputs
    assert chain.input_shape == [1, 28, 28]
    assert chain.images_hash == hash_tensor(expected)
    assert chain.images_source["preprocessing"] == "fashion-mnist" and chain.images_source["size"] == 28
    assert chain.images_source["grayscale"] is True
    assert chain.class_names == zoo.default_class_names()
    with torch.no_grad():
        predicted = sorted(set(zoo.default_model()(expected).argmax(1).tolist()))
    assert chain.classes == predicted

    code, out, err = _run(capsys, "inspect", chain_path)
    assert code == 0, err
    names = ", ".join(zoo.FASHION_CLASSES[c] for c in predicted)
    assert f"region: extracted for images the model classifies as {names}; outside this region" in out

    code, _, err = _run(capsys, "export", chain_path, "--out", tmp_path / "out", "--formats", "ts", "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    pre = manifest["input"]["preprocessing"]
    assert pre["kind"] == "fashion-mnist" and pre["size"] == 28 and pre["channels"] == "grayscale"
    assert pre["mean"] == [zoo.FASHION_MEAN] and pre["std"] == [zoo.FASHION_STD]
    assert manifest["input"]["shape"] == [1, 28, 28]
    region = manifest["region"]
    assert region["classes"] == predicted
    assert region["names"] == [zoo.FASHION_CLASSES[c] for c in predicted]
    assert "not expected to agree" in region["note"]
    code, out, err = _run(capsys, "inspect", tmp_path / "out")
    assert code == 0, err
    region_line = next(line for line in out.splitlines() if line.startswith("region:"))
    assert all(zoo.FASHION_CLASSES[c] in region_line for c in predicted)
    assert "not expected to agree with the original" in region_line


def test_folder_labels_the_model_disagrees_with_get_a_warning(tmp_path, capsys):
    # sneakers filed as "bag", ankle boots as "Sandal": the model agrees with none of the labels
    folder = tmp_path / "mislabelled"
    _sample_folder(folder, {"bag": "sneaker", "Sandal": "ankle-boot"}, per_class=2)
    code, _, err = _run(capsys, "extract", "--images", folder, "--steps", "2", "--no-finetune", "--json",
                        "--out", tmp_path / "c.json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("nchains: warning:")]
    assert len(warnings) == 1 and "classifies only 0% of the images as their folder's class" in warnings[0]


def test_folders_that_are_not_model_classes_and_too_few_images(tmp_path, capsys):
    folder = tmp_path / "pets"
    _sample_folder(folder, {"cats": "bag", "dogs": "bag"}, per_class=3)
    code, _, err = _run(capsys, "extract", "--images", folder, "--per-class", "1000000000", "--steps", "2",
                        "--no-finetune", "--json", "--out", tmp_path / "c.json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("nchains: warning:")]
    assert len(warnings) == 2, err
    assert "--per-class 1000000000 but the folder has fewer images: cats 3, dogs 3; using all of them (6" in warnings[0]
    assert "not all class names of the model" in warnings[1]
    chain = Chain.load(tmp_path / "c.json")
    assert chain.class_names == zoo.default_class_names()  # the model's names, not the folders'


def test_folder_names_name_the_outputs_of_a_model_without_names(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    folder = tmp_path / "imgs"
    for c in ("cats", "dogs", "owls"):
        (folder / c).mkdir(parents=True)
        Image.fromarray((np.random.default_rng(1).random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / c / "0.png")
    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    code, _, err = _run(capsys, "extract", "--model", "torchvision:resnet18", "--weights", weights, "--images", folder,
                        "--size", "16", *_FAST, "--out", tmp_path / "c.json")
    assert code == 0, err
    chain = Chain.load(tmp_path / "c.json")
    assert chain.class_names == ["cats", "dogs", "owls"]
    assert chain.images_source["preprocessing"] == "imagenet" and chain.input_shape == [3, 16, 16]


def test_python_api_chain_of_the_shipped_model_records_its_spec(tmp_path, capsys):
    import nchains

    images, _, _ = zoo.default_images(["bag"], per_class=2)
    chain = nchains.extract(zoo.default_model(), images, steps=2, finetune=False)
    assert chain.model_spec == {"kind": "default"}
    assert capsys.readouterr().err == ""  # progress=None: no bar when stderr is not a terminal
    other = zoo.fashion_resnet()  # same architecture, other weights: not the shipped model
    chain2 = nchains.extract(other.eval(), images, steps=1, finetune=False)
    assert chain2.model_spec is None


def test_python_api_shows_progress_on_a_terminal(monkeypatch):
    import io
    import sys

    import nchains

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    images, _, _ = zoo.default_images(["bag"], per_class=1)
    monkeypatch.setattr(sys, "stderr", Terminal())
    nchains.extract(zoo.default_model(), images, steps=2, finetune=False)
    assert "scoring" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    nchains.extract(zoo.default_model(), images, steps=2, finetune=False, progress=False)
    assert sys.stderr.getvalue() == ""

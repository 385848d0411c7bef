"""The nchains command line: the main job on the shipped model, and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nchains import Chain
from nchains import cli
from nchains.models import zoo


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_on_shipped_default_writes_a_loadable_chain(tmp_path, capsys):
    out_path = tmp_path / "chain.json"
    code, out, err = _run(capsys, "extract", "--classes", "sneaker,ankle-boot", "--per-class", "4", "--steps", "20",
                          "--finetune-steps", "5", "--out", str(out_path))
    assert code == 0, err
    chain = Chain.load(out_path)
    assert chain.model_spec == {"kind": "default"}
    assert chain.class_names == zoo.default_class_names()
    assert f"filters kept {chain.metrics['filters_kept']}/{chain.metrics['filters_total']}" in out
    assert "Inference chain:" in out and "wrote" in out
    masked = chain.apply(zoo.default_model())
    images, _, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=4)
    with torch.no_grad():
        agree = (masked(images).argmax(1) == zoo.default_model()(images).argmax(1)).float().mean().item()
    assert agree == chain.metrics["agreement"]


def test_extract_json_is_machine_readable(tmp_path, capsys):
    code, out, err = _run(capsys, "extract", "--classes", "bag", "--per-class", "2", "--steps", "3",
                          "--no-finetune", "--out", str(tmp_path / "c.json"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data["metrics"]) >= {"filters_kept", "filters_total", "kl", "agreement", "prob_drop"}
    assert data["out"] == str(tmp_path / "c.json")


def test_extract_torchvision_model_on_an_image_folder(tmp_path, capsys):
    torch.manual_seed(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            arr = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    weights = tmp_path / "w.pt"
    torch.save(__import__("torchvision").models.resnet18(num_classes=3).state_dict(), weights)
    code, out, err = _run(capsys, "extract", "--model", "torchvision:resnet18", "--weights", str(weights),
                          "--images", str(tmp_path / "imgs"), "--size", "32", "--steps", "2", "--no-finetune",
                          "--quiet", "--out", str(tmp_path / "c.json"))
    assert code == 0, err
    chain = Chain.load(tmp_path / "c.json")
    assert chain.input_shape == [3, 32, 32]
    assert chain.model_spec["name"] == "resnet18" and chain.model_spec["weights"] == str(weights)


@pytest.mark.parametrize("argv,needle", [
    (["extract", "--classes", "sneaker,unicorn"], "unicorn"),
    (["extract", "--per-class", "0"], "--per-class must be >= 1"),
    (["extract", "--model", "foo"], "--model must be 'default', 'torchvision:NAME' or a"),
    (["extract", "--model", "torchvision:nope"], "not a torchvision classification model"),
    (["extract", "--weights", "w.pt"], "--weights needs --model torchvision:NAME"),
    (["extract", "--model", "torchvision:resnet18"], "--images DIR is required"),
    (["extract", "--steps", "-1"], "steps must be an int >= 0"),
    (["extract", "--tau", "-1"], "tau must be a number >= 0"),
    (["extract", "--steps", "abc"], "argument --steps: invalid int value"),
    (["extract", "--model", "torchvision:resnet18", "--weights", "missing.pt"], "--weights 'missing.pt' does not exist"),
    (["bogus"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        raise SystemExit(cli.main(argv))
    out, err = capsys.readouterr()
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nchains: error:") and needle in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "chain.json").exists()


def test_out_directory_is_rejected_before_any_work(tmp_path, capsys):
    code, out, err = _run(capsys, "extract", "--out", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_console_script_help_and_error():
    help_text = subprocess.run([sys.executable, "-m", "nchains.cli", "extract", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for flag in ("--model", "--weights", "--images", "--classes", "--per-class", "--quiet", "--json", "--out"):
        assert flag in help_text
    bad = subprocess.run([sys.executable, "-m", "nchains.cli", "extract", "--per-class", "0"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_extract_on_a_torch_export_file(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    ep = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    torch.export.save(ep, tmp_path / "m.pt2")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "imgs" / f"{i}.png")
    code, out, err = _run(capsys, "extract", "--model", str(tmp_path / "m.pt2"), "--images", str(tmp_path / "imgs"),
                          "--size", "32", "--steps", "2", "--no-finetune", "--quiet", "--out", str(tmp_path / "c.json"))
    assert code == 0, err
    chain = Chain.load(tmp_path / "c.json")
    assert chain.model_spec == {"kind": "file", "path": str(tmp_path / "m.pt2")}
    assert chain.labels["layer4.0.conv2"] == "L4B1C2"


def _export_manifest(capsys, chain_path, out):
    code, _, err = _run(capsys, "export", str(chain_path), "--out", str(out), "--formats", "ts", "--json")
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text()), err


def test_default_chain_records_its_images_and_export_rebuilds_them(tmp_path, capsys):
    # unusual choices that the old hash search (per_class guesses, orders of <= 3 classes, default
    # confidence) could not find
    chain_path = tmp_path / "c.json"
    code, _, err = _run(capsys, "extract", "--classes", "sneaker,bag,t-shirt,sandal", "--per-class", "3", "--seed", "7",
                        "--confident", "0.9", "--steps", "2", "--no-finetune", "--quiet", "--out", str(chain_path))
    assert code == 0, err
    chain = Chain.load(chain_path)
    assert chain.images_source == {"kind": "default", "classes": ["sneaker", "bag", "t-shirt", "sandal"],
                                   "per_class": 3, "seed": 7, "confident": 0.9}
    images, _, _ = zoo.default_images(["sneaker", "bag", "t-shirt", "sandal"], per_class=3, seed=7, confident=0.9)
    from nchains._util.io import hash_tensor

    assert hash_tensor(images) == chain.images_hash
    manifest, err = _export_manifest(capsys, chain_path, tmp_path / "out")
    info = manifest["verification"]["inputs"]
    assert info["images"] == {"count": 12, "sha256": chain.images_hash, "chain_images": True}
    assert info["images_note"].startswith("the chain's 12 shipped Fashion-MNIST test images (rebuilt")
    assert manifest["chain"]["images_source"] == chain.images_source
    assert "warning" not in err


def test_old_default_chain_without_source_still_exports(tmp_path, capsys):
    chain_path = tmp_path / "c.json"
    code, _, err = _run(capsys, "extract", "--classes", "bag,sandal", "--per-class", "2", "--steps", "2",
                        "--no-finetune", "--quiet", "--out", str(chain_path))
    assert code == 0, err
    data = json.loads(chain_path.read_text())
    del data["images_source"]
    data["version"] = 1
    if "strongest_filters" in data:  # version 3 renamed version 1's paths
        data["paths"] = data.pop("strongest_filters")
    chain_path.write_text(json.dumps(data))
    manifest, err = _export_manifest(capsys, chain_path, tmp_path / "out")
    assert manifest["verification"]["inputs"]["images"]["chain_images"] is True  # found by the hash search
    assert manifest["chain"]["images_source"] is None and "warning" not in err


def test_folder_chain_records_its_images_and_export_rebuilds_them(tmp_path, capsys):
    torch.manual_seed(0)
    folder = tmp_path / "imgs"
    for cls in ("cats", "dogs", "owls"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            arr = (torch.rand(36, 40, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(folder / cls / f"{i}.png")
    weights = tmp_path / "w.pt"
    torch.save(__import__("torchvision").models.resnet18(num_classes=3).state_dict(), weights)
    chain_path = tmp_path / "c.json"
    code, _, err = _run(capsys, "extract", "--model", "torchvision:resnet18", "--weights", str(weights),
                        "--images", str(folder), "--classes", "owls,cats", "--per-class", "2", "--size", "32",
                        "--preprocessing", "none", "--steps", "2", "--no-finetune", "--quiet", "--out", str(chain_path))
    assert code == 0, err
    chain = Chain.load(chain_path)
    assert chain.images_source == {"kind": "folder", "path": str(folder.resolve()), "size": 32, "preprocessing": "none",
                                   "grayscale": False, "classes": ["owls", "cats"], "per_class": 2}
    manifest, err = _export_manifest(capsys, chain_path, tmp_path / "out")
    info = manifest["verification"]["inputs"]
    assert info["images"] == {"count": 4, "sha256": chain.images_hash, "chain_images": True}
    assert info["images_note"].startswith(f"the chain's 4 images from {folder.resolve()} (rebuilt")
    from nchains.models.images import describe_preprocessing

    assert manifest["input"]["preprocessing"] == describe_preprocessing("none", 32, False)
    assert manifest["input"]["preprocessing"]["formula"] == "x = p / 255"

    # the folder changed: export says so and falls back (no real images for a torchvision model)
    Image.fromarray((torch.rand(36, 40, 3) * 255).to(torch.uint8).numpy()).save(folder / "cats" / "0.png")
    manifest, err = _export_manifest(capsys, chain_path, tmp_path / "out2")
    info = manifest["verification"]["inputs"]
    assert "images" not in info
    note = info["images_note"]
    assert "could not be rebuilt" in note and "differs from the chain's images_hash" in note
    assert "nchains: warning: the chain's images could not be rebuilt" in err
    # and when the folder is gone
    import shutil

    shutil.rmtree(folder)
    manifest, err = _export_manifest(capsys, chain_path, tmp_path / "out3")
    assert "could not be rebuilt from its images_source" in manifest["verification"]["inputs"]["images_note"]
    assert "does not exist" in err

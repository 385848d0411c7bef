"""``nchains paths`` end to end on the shipped model: files, summary, reproducibility."""

import json

import pytest
import torch
from PIL import Image

from nchains import cli, zoo
from nchains.critical_paths import CriticalPath, critical_paths

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paths_writes_masks_summary_and_pngs(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["paths", "--default-index", "3", "--sparsity", "0.9,0.99", "--method", "mct", "--out",
                     str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "paths.json").read_text())
    assert printed == summary
    assert sorted(p.name for p in out.iterdir()) == sorted(["attribution_0_9.png", "attribution_0_99.png", "paths.json",
                                                             "path_0_9.npz", "path_0_99.npz"])
    images, labels, _ = zoo.fashion_sample()
    x = zoo.normalize_fashion(images[3:4]).unsqueeze(1)
    model = zoo.default_model()
    want = critical_paths(model, x, [0.9, 0.99], method="mct")
    assert summary["image"]["index"] == 3 and summary["target"] == want[0].target
    assert summary["target_label"] == zoo.FASHION_CLASSES[want[0].target]
    for entry, ref in zip(summary["paths"], want):
        assert entry["kept"] == round((1 - entry["requested_sparsity"]) * entry["total"]) == ref.n_kept
        assert [s["kept"] for s in entry["sites"]] == [ref.kept_per_site[s.key] for s in ref.sites]
        back = CriticalPath.load(out / entry["file"])
        assert all(torch.equal(back.mask[k], ref.mask[k]) for k in ref.mask)
        assert torch.equal(back.image, x)
        with Image.open(out / entry["png"]) as png:
            assert png.format == "PNG" and png.width > png.height > 100
    # an earlier output is replaced as a whole (fewer sparsities: the old files go)
    assert cli.main(["paths", "--default-index", "3", "--sparsity", "0.5", "--method", "mct", "--out", str(out),
                     "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["attribution_0_5.png", "paths.json", "path_0_5.npz"])
    assert capsys.readouterr().out == ""


def test_paths_of_an_image_file_see_the_shipped_preprocessing(tmp_path, capsys):
    images, _, _ = zoo.fashion_sample()
    Image.fromarray(images[10].numpy()).save(tmp_path / "img.png")  # a 28x28 PNG: only normalised
    out = tmp_path / "out"
    assert cli.main(["paths", "--image", str(tmp_path / "img.png"), "--sparsity", "0.95", "--method", "mct",
                     "--target", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["image"]["kind"] == "file" and summary["image"]["preprocessing"] == "fashion-mnist"
    assert summary["target"] == 2 and summary["paths"][0]["kept"] == round(0.05 * summary["paths"][0]["total"])
    back = CriticalPath.load(out / "path_0_95.npz")
    assert torch.allclose(back.image, zoo.normalize_fashion(images[10:11]).unsqueeze(1), atol=1e-6)
    assert back.target == 2

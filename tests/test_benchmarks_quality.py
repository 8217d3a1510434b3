"""Smoke tests of the quality benchmark (benchmarks/quality.py and its data, augmentations, encoders, methods)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality  # noqa: E402
from benchmarks.augment import ImageAugment, SignalAugment  # noqa: E402
from benchmarks.datasets import load, load_mnist1d, protocol_data, random_templates  # noqa: E402
from benchmarks.encoders import DigitCNN, ResNet18, SignalCNN  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_mnist1d(num_samples=300, seed=3)


def test_mnist1d_is_generated_locally_and_deterministically(tiny):
    again = load_mnist1d(num_samples=300, seed=3)
    assert tiny.train.x.shape == (240, 40) and tiny.test.x.shape == (60, 40)
    assert torch.equal(tiny.train.x, again.train.x) and torch.equal(tiny.test.y, again.test.y)
    other = load_mnist1d(num_samples=300, seed=3, templates=random_templates())
    assert other.name == "mnist1d-tune" and not torch.equal(other.train.x, tiny.train.x)


def test_protocol_splits(tiny):
    seen = protocol_data(tiny, "seen")
    assert seen.train is tiny.train and seen.gallery is tiny.train and seen.query is tiny.test
    unseen = protocol_data(tiny, "unseen")
    assert set(unseen.train.y.tolist()) == {0, 1, 2, 3, 4}
    assert set(unseen.query.y.tolist()) == {5, 6, 7, 8, 9}
    assert len(unseen.train) + len(unseen.query) == len(tiny.train) + len(tiny.test)
    assert unseen.gallery is None
    with pytest.raises(ValueError, match="protocol"):
        protocol_data(tiny, "both")


@pytest.mark.parametrize("name", ["cifar10", "cub200"])
def test_local_data_sets_need_a_folder(name, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load(name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(name, str(tmp_path / "missing"))


def test_signal_augment_identity_and_reproducibility():
    x = torch.randn(5, 40)
    off = SignalAugment(shift=0, stretch=(1, 1), scale=(1, 1), shear=0, corr_noise=0, white_noise=0)
    torch.testing.assert_close(off(x), x)
    a = SignalAugment(generator=torch.Generator().manual_seed(0))(x)
    b = SignalAugment(generator=torch.Generator().manual_seed(0))(x)
    assert torch.equal(a, b) and not torch.allclose(a, x)
    # a pure circular shift interpolates between neighbours around the circle, so each signal keeps its sum
    shift = SignalAugment(shift=3, stretch=(1, 1), scale=(1, 1), shear=0, corr_noise=0, white_noise=0)
    y = shift(x)
    torch.testing.assert_close(y.sum(1), x.sum(1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y, x)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        off(torch.randn(2, 1, 40))


def test_image_augment_shapes():
    augment = ImageAugment(generator=torch.Generator().manual_seed(0))
    out = augment(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ValueError, match="C, H, W"):
        augment(torch.rand(3, 16, 16))


def test_encoders_shapes():
    assert SignalCNN(32, 4)(torch.randn(3, 40)).shape == (3, 32)
    assert SignalCNN(32, 4, head="linear").backbone(torch.randn(3, 40)).shape == (3, 16)
    assert DigitCNN(16, 4)(torch.rand(2, 1, 28, 28)).shape == (2, 16)
    assert ResNet18(8)(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="head"):
        SignalCNN(8, 4, head="conv")


def test_quick_flag_and_overrides():
    settings, out, progress = quality.parse_args(["--quick", "--seeds", "4", "5", "--temperature", "0.2"])
    assert settings.epochs == quality.QUICK["epochs"] and settings.seeds == (4, 5)
    assert settings.method.temperature == 0.2 and out.name == "mnist1d-quick" and progress


def test_every_method_runs_and_writes_outputs(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(quality._DATA_CACHE, ("mnist1d", None), tiny)
    settings, _, _ = quality.parse_args(
        ["--epochs", "2", "--eval-every", "1", "--batch-size", "16", "--seeds", "0", "1", "--workers", "1",
         "--width", "4", "--queue-size", "64", "--xbm-size", "64", "--mochi-hard", "8", "--mochi-mix", "4",
         "--mochi-query-mix", "2", "--mochi-warmup", "1", "--merge-warmup", "1", "--knn-k", "5"]
    )
    results = quality.run(settings, tmp_path, progress=False)
    for name in ("results.json", "results.md", "curves.png", "finals.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["summary"]) == {"seen", "unseen"}
    assert set(saved["summary"]["seen"]) == set(quality.ALL_METHODS)
    full = [r for r in results["runs"] if r["method"] == "full" and r["protocol"] == "seen"]
    assert len(full) == 2 and len(full[0]["history"]) == 2 and 0 <= full[0]["final"]["knn"] <= 1
    assert "recall@1" in saved["summary"]["unseen"]["xbm"] and "map@r" in saved["summary"]["unseen"]["moco"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| full |" in markdown and "Target (issue 5)" in markdown

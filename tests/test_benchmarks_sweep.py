"""The cluttered-digits test bed, the validation split and the recipe sweep's choices."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import sweep  # noqa: E402
from benchmarks.datasets import DataSet, Split, clutter  # noqa: E402
from benchmarks.quality_run import run_tasks  # noqa: E402
from benchmarks.quality_settings import resolve  # noqa: E402


def digits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_clutter_places_each_digit_whole_and_is_deterministic():
    x = digits(6)
    plain = clutter(x, seed=3, fragments=0)
    assert plain.shape == (6, 1, 40, 40)
    for image, digit in zip(plain[:, 0], x[:, 0]):
        # without fragments the canvas is the digit at one offset, zeros elsewhere
        found = [
            (r, c)
            for r in range(13)
            for c in range(13)
            if torch.equal(image[r : r + 28, c : c + 28], digit)
            and float(image.sum()) == pytest.approx(float(digit.sum()))
        ]
        assert len(found) == 1
    again = clutter(x, seed=3)
    assert torch.equal(again, clutter(x, seed=3)) and not torch.equal(again, clutter(x, seed=4))
    # fragments only add strokes (the brighter pixel wins), and at the same positions the digit stays
    assert bool((again >= plain).all()) and float(again.sum()) > float(plain.sum())


def test_clutter_fragments_come_from_other_digits():
    x = torch.zeros(5, 1, 28, 28)
    x[0] = 1.0  # only digit 0 has ink: its own canvas holds just the digit, the others only 10x10 pieces of it
    out = clutter(x, seed=0, fragments=3)
    assert float(out[0].sum()) == 28 * 28
    others = out[1:, 0]
    assert float(others.sum()) > 0
    for image in others:
        ink = image.nonzero()
        if len(ink):
            assert int(ink[:, 0].max() - ink[:, 0].min()) < 3 * 10 and float(image.sum()) <= 3 * 100


@pytest.mark.parametrize(
    "bad, match", [(torch.rand(3, 1, 32, 32), r"\(N, 1, 28, 28\)"), (torch.rand(1, 1, 28, 28), "2")]
)
def test_clutter_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        clutter(bad, seed=0)


def test_validation_split_is_a_disjoint_part_of_the_train_split_only():
    x = torch.arange(50, dtype=torch.float32).view(50, 1)
    data = DataSet("mnist5k", "image", Split(x, torch.arange(50) % 5), Split(-x[:10], torch.zeros(10).long()))
    held = sweep.validation_split(data, 0.2)
    fit, val = set(held.train.x.flatten().tolist()), set(held.test.x.flatten().tolist())
    assert len(val) == 10 and len(fit) == 40 and fit.isdisjoint(val) and fit | val == set(range(50))
    assert torch.equal(held.test.y, held.test.x.flatten().long() % 5)
    with pytest.raises(ValueError, match="share"):
        sweep.validation_split(data, 1.0)


def fake_record(scores: dict[int, float]) -> dict:
    return {"final": {f"knn@{k}": v for k, v in scores.items()}}


def test_recipes_one_axis_at_a_time_and_the_combination_of_the_best():
    recipes = sweep.one_at_a_time()
    assert recipes[0] == sweep.BASE and len(recipes) == 1 + sum(len(v) - 1 for v in sweep.AXES.values())
    for recipe in recipes[1:]:
        assert sum(recipe[k] != sweep.BASE[k] for k in sweep.BASE) == 1
    # each run scores the value it changed (base 0.5): crop 0.7 and lr 3e-3 beat the base, the others do not
    wins = {("crop_min", 0.7): 0.8, ("crop_min", 0.5): 0.6, ("lr", 3e-3): 0.55, ("batch_size", 256): 0.4}
    records = []
    for recipe in recipes:
        changed = [(k, recipe[k]) for k in sweep.BASE if recipe[k] != sweep.BASE[k]]
        score = wins.get(changed[0], 0.45) if changed else 0.5
        records.append(fake_record({k: score - k / 1000 for k in sweep.KNN_K}))
    assert sweep.combined(recipes, records) == {**sweep.BASE, "crop_min": 0.7, "lr": 3e-3}
    assert sweep.best(records[0]) == (pytest.approx(0.49), 10)


def test_sweep_runs_end_to_end_on_a_tiny_bed(monkeypatch):
    images = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    data = DataSet("mnist5k", "image", Split(images, torch.arange(40) % 4), Split(images[:8], torch.zeros(8).long()))
    monkeypatch.setattr(sweep, "load", lambda name: data)
    monkeypatch.setattr(
        sweep, "AXES", {"crop_min": (0.3, 0.7), "batch_size": (64,), "temperature": (0.07,), "lr": (1e-3,)}
    )
    monkeypatch.setattr(sweep, "KNN_K", (1, 3))
    result = sweep.run("mnist5k", 0.25, epochs=1, progress=False)
    assert [r["label"] for r in result["runs"]] == ["base", "crop_min 0.7"]
    assert set(result["chosen"]) == {*sweep.BASE, "knn_k", "validation_knn"}
    top = max(max(r["validation"].values()) for r in result["runs"])
    assert result["chosen"]["validation_knn"] == top and result["chosen"]["knn_k"] in (1, 3)
    assert result["settings"]["epochs"] == 1 and result["settings"]["width"] == 16
    assert set(result["raw_input"]) == {1, 3} and "raw pixels" in sweep.table(result)


def test_run_tasks_returns_records_in_the_order_of_the_tasks():
    images = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    data = DataSet("mnist5k", "image", Split(images, torch.arange(24) % 3), Split(images[:6], torch.arange(6) % 3))
    fast = resolve("mnist5k", False, {"epochs": 1, "workers": 1, "width": 4})
    slow = resolve("mnist5k", False, {"epochs": 2, "workers": 1, "width": 4})
    tasks = [(fast, ("npid", "seen", 0)), (slow, ("npid-4v", "seen", 1)), (fast, ("raw", "seen", 0))]
    lines = []
    runs = run_tasks(tasks, data, progress=False, log=lines.append)
    assert [(r["method"], r["seed"], len(r["history"])) for r in runs] == [
        ("npid", 0, 1),
        ("npid-4v", 1, 2),
        ("raw", 0, 0),
    ]
    assert len(lines) == 3

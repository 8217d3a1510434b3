"""benchmarks/merge_replay.py: replays find planted copies that stand apart, and report them as the harness does."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import merge_replay
from benchmarks.datasets import DataSet, Split
from benchmarks.merge_replay import (
    CRITERIA,
    harness_criterion,
    input_distances,
    merged_input_distances,
    merged_pairs,
    pairs_figure,
    replay,
    replay_with_groups,
    summary,
    table,
)
from benchmarks.quality_settings import MethodSettings, Settings, resolve


def recorded_run(rounds=3, n=60, copies=6, seed=0, bank_noise=0.0):
    """Random rows with ``copies`` planted near-copies appended, kept identical over ``rounds`` rounds."""
    gen = torch.Generator().manual_seed(seed)
    originals = F.normalize(torch.randn(n, 32, generator=gen), dim=1)
    pairs = torch.stack([torch.arange(copies), n + torch.arange(copies)], dim=1)
    x = torch.cat([originals, originals[:copies] + 0.01 * torch.randn(copies, 32, generator=gen)])
    bank = x + bank_noise * torch.randn(x.shape, generator=gen)
    kept = [{"epoch": 10 + r, "embeddings": x, "bank": bank} for r in range(rounds)]
    labels = torch.cat([torch.arange(n) % 5, torch.arange(copies) % 5])
    return {"settings": Settings(method=MethodSettings()), "rounds": kept, "pairs": pairs, "labels": labels}


def test_a_replay_finds_every_planted_copy_and_nothing_else():
    rounds = replay(recorded_run(rounds=25), {"ratio": 0.5})
    assert [r["epoch"] for r in rounds][:2] == [10, 11]
    found = summary(rounds)
    # the share schedule takes 5% of the passing pairs in round 1, then more: every copy joins in the end
    assert found["planted_recall"] == 1.0 and found["reachable_recall"] == 1.0
    assert found["lowest_precision"] == 1.0 and found["entries_merged"] == 12
    assert rounds[0]["pairs_merged"] == 1


def test_the_bank_confirmation_refuses_copies_the_bank_rows_do_not_hold():
    recorded = recorded_run(rounds=25, bank_noise=1.0)  # bank rows unrelated to the embeddings' pairs
    assert summary(replay(recorded, {"ratio": 0.5}))["planted_recall"] == 1.0
    confirmed = summary(replay(recorded, {"ratio": 0.5, "bank_ratio": 0.5}))
    assert confirmed["planted_recall"] == 0.0 and confirmed["entries_merged"] == 0
    assert confirmed["lowest_precision"] is None


def test_the_table_has_one_row_per_criterion():
    rounds = replay(recorded_run(), {"ratio": 0.5})
    text = table({"criteria": [{"name": "a", "summary": summary(rounds)}, {"name": "b", "summary": summary(rounds)}]})
    assert text.count("\n| a |") == 1 and text.count("\n| b |") == 1


def test_input_distances_against_a_loop():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=gen)
    pairs = torch.tensor([[0, 9], [4, 10], [7, 11]])
    x[9] = x[0] + 0.01  # a near copy; 10 and 11 are unrelated samples
    copies, others = [], []
    for original, copy in pairs.tolist():
        copies.append(float((x[original] - x[copy]).norm()))
        others.append(min(float((x[original] - x[j]).norm()) for j in range(12) if j not in (original, copy)))
    found = input_distances(x, pairs)
    assert abs(found["copy"] - torch.tensor(copies).median().item()) < 1e-5
    assert abs(found["nearest_other"] - torch.tensor(others).median().item()) < 1e-5
    assert abs(found["copy_is_nearest"] - sum(c < o for c, o in zip(copies, others)) / 3) < 1e-6


def test_merged_pairs_against_a_loop():
    groups = torch.tensor([0, 0, 2, 3, 0, 3, 6, 7, 7, 7])
    expected = [(i, j) for i, j in itertools.combinations(range(10), 2) if groups[i] == groups[j]]
    assert sorted(map(tuple, merged_pairs(groups).tolist())) == expected
    assert merged_pairs(torch.arange(5)).shape == (0, 2)


def test_merged_input_distances_against_a_loop():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, generator=gen)
    pairs = torch.tensor([[0, 6], [1, 7]])
    groups = torch.tensor([0, 1, 2, 2, 4, 5, 0, 1])  # both copies merged; (2, 3) is not planted
    copies = [float((x[0] - x[6]).norm()), float((x[1] - x[7]).norm())]
    other = float((x[2] - x[3]).norm())
    found = merged_input_distances(groups, pairs, x, copy=other + 1.0)
    assert abs(found["planted"] - torch.tensor(copies).median().item()) < 1e-5
    assert abs(found["other"] - other) < 1e-5 and found["other_nearer_than_copy"] == 1.0
    assert merged_input_distances(groups, pairs, x, copy=other - 1e-3)["other_nearer_than_copy"] == 0.0
    alone = merged_input_distances(torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), pairs, x, copy=1.0)
    assert alone["other"] is None and alone["other_nearer_than_copy"] is None


def test_a_replay_places_its_merged_pairs_in_the_input_and_draws_them(tmp_path):
    recorded = recorded_run(rounds=25)
    x = torch.cat([row["embeddings"] for row in recorded["rounds"][:1]])
    recorded.update(x=x, kind="signal", input=input_distances(x, recorded["pairs"]))
    rounds, groups = replay_with_groups(recorded, {"ratio": 0.5})
    found = summary(rounds)
    assert found["input_planted"] is not None and found["input_other"] is None  # only the copies merged
    assert abs(found["input_planted"] - recorded["input"]["copy"]) < 1e-5  # every copy merged: the same median
    assert "| - |" in table({"criteria": [{"name": "a", "summary": found}]})
    pairs_figure(tmp_path / "pairs.png", groups, recorded["pairs"], x, "signal", count=4)
    assert (tmp_path / "pairs.png").stat().st_size > 0


def test_a_replay_searches_the_kept_tensor_its_criterion_names():
    recorded = recorded_run(rounds=25)
    gen = torch.Generator().manual_seed(3)
    for kept in recorded["rounds"]:  # the copies stand apart in the backbone features only
        kept["backbone"] = kept["embeddings"]
        kept["embeddings"] = F.normalize(torch.randn(kept["backbone"].shape, generator=gen), dim=1)
    arguments = {"search": "backbone", "ratio": 0.5}
    assert summary(replay(recorded, arguments))["planted_recall"] == 1.0
    assert arguments == {"search": "backbone", "ratio": 0.5}  # the criterion is left as it was
    assert summary(replay(recorded, {"ratio": 0.5}))["planted_recall"] == 0.0


def test_a_later_first_round_replays_the_rounds_from_that_epoch_as_if_none_came_before():
    recorded = recorded_run(rounds=25)
    late = replay(recorded, {"ratio": 0.5, "from_epoch": 15})
    assert [r["epoch"] for r in late] == list(range(15, 35))
    shortened = {**recorded, "rounds": recorded["rounds"][5:]}
    assert late == replay(shortened, {"ratio": 0.5})  # the share schedule starts again at the first round replayed


@pytest.mark.parametrize("dataset", ["mnist1d-tune", "mnist5k"])
def test_the_harness_criterion_of_each_replayed_data_set_is_one_of_the_rows(dataset):
    # main() draws pairs.png for the row equal to the harness's criterion: each data set's must be there.
    method = resolve(dataset, False, {}).method
    criterion = harness_criterion(method)
    assert criterion in [arguments for _, arguments in CRITERIA]
    assert criterion.items() >= method.merge_kwargs.items()  # e.g. mnist5k's pairs only
    assert criterion.get("search", "embeddings") == {"mnist1d-tune": "embeddings", "mnist5k": "spatial"}[dataset]


@pytest.mark.parametrize("protocol", ["seen", "unseen"])
def test_a_recording_keeps_the_planted_pairs_and_labels_of_the_protocol_it_trained(monkeypatch, protocol):
    # The recorded run trains on the protocol's training data plus its copies; the replay must score the same.
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.rand(n, 1, 8, 8, generator=gen), torch.arange(n) % 4)

    data = DataSet("mnist5k", "image", split(40), split(20))
    seen = {}

    def fake_run_job(settings, job, data_, on_round):
        seen["job"] = job
        seen["train"] = merge_replay.protocol_data(data_, job[1]).train
        return {"final": {}}

    monkeypatch.setattr(merge_replay, "load", lambda name: data)
    monkeypatch.setattr(merge_replay, "run_job", fake_run_job)
    recorded = merge_replay.record("mnist5k", 3, protocol)
    assert seen["job"] == ("full", protocol, 3)
    expected = {"seen": 40, "unseen": 30}[protocol]  # unseen: classes 0-1 of the 60 samples of both splits
    assert len(seen["train"]) == expected
    originals = recorded["pairs"][:, 0]
    assert len(recorded["labels"]) == expected + len(recorded["pairs"]) and bool((originals < expected).all())
    assert torch.equal(recorded["labels"][:expected], seen["train"].y)
    assert torch.equal(recorded["x"][recorded["pairs"][:, 0]], seen["train"].x[originals])


def test_a_run_without_planted_copies_is_scored_by_class_purity_round_by_round():
    # Rows 0-5 are three tight pairs; the pair (2, 3) mixes two classes. Purity after each round, by hand.
    recorded = recorded_run(rounds=4, n=60, copies=0)
    x = recorded["rounds"][0]["embeddings"].clone()
    x[1], x[3], x[5] = x[0] + 0.01, x[2] + 0.01, x[4] + 0.01
    x = F.normalize(x, dim=1)
    labels = torch.arange(60) % 5
    labels[:6] = torch.tensor([0, 0, 1, 2, 3, 3])
    recorded.update(pairs=torch.zeros(0, 2, dtype=torch.long), labels=labels)
    recorded["rounds"] = [{"epoch": 10 + r, "embeddings": x, "bank": x} for r in range(4)]
    rounds = replay(recorded, {"ratio": 0.5, "initial_share": 1.0, "max_share": 1.0})
    assert [r["class_purity"] for r in rounds] == [2 / 3] * 4 and rounds[0]["planted_precision"] is None
    found = summary(rounds)
    assert found["lowest_class_purity"] == 2 / 3 and found["rounds_under_purity"] == 4
    assert found["last_class_purity"] == 2 / 3 and found["entries_merged"] == 6
    text = table({"planted_pairs": 0, "criteria": [{"name": "a", "summary": found}]})
    assert "| a | 6 | 0.667 | 4 | 0.667 |" in text and "reachable" not in text


def test_a_recording_without_copies_trains_on_the_data_as_it_is(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    data = DataSet("mnist1d-tune", "signal", Split(torch.rand(40, 16, generator=gen), torch.arange(40) % 4), None)
    seen = {}

    def fake_run_job(settings, job, data_, on_round):
        seen["settings"] = settings
        return {"final": {}}

    monkeypatch.setattr(merge_replay, "load", lambda name: data)
    monkeypatch.setattr(merge_replay, "run_job", fake_run_job)
    recorded = merge_replay.record("mnist1d-tune", 0, planted=0.0, epochs=7)
    assert seen["settings"].plant_duplicates == 0.0 and seen["settings"].epochs == 7
    assert recorded["pairs"].shape == (0, 2) and recorded["input"] is None
    assert torch.equal(recorded["labels"], data.train.y)


def test_rows_searching_a_space_the_recording_lacks_are_left_out(monkeypatch, tmp_path):
    # A signals' recording keeps no digit block maps: main() replays the rows it can and skips the others.
    recorded = {**recorded_run(rounds=2), "x": torch.zeros(66, 32), "kind": "signal", "final": {}, "input": None}
    monkeypatch.setattr(merge_replay, "record", lambda *args: recorded)
    rows = ["embeddings, ratio 0.75", "block 2 map 0.9, bank 0.8, groups of at most 3"]
    assert merge_replay.main(["--rows", *rows, "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in saved["criteria"]] == ["embeddings, ratio 0.75"]
    assert any(name.startswith("block 2 map 0.9") for name, _ in CRITERIA)

"""The quality benchmark: its data, augmentations, encoders, settings, diagnostics, runner and report."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality, quality_report, quality_run  # noqa: E402
from benchmarks.augment import ImageAugment, SignalAugment  # noqa: E402
from benchmarks.datasets import load, load_mnist1d, plant_duplicates, protocol_data, random_templates  # noqa: E402
from benchmarks.encoders import DigitCNN, ResNet18, SignalCNN  # noqa: E402
from benchmarks.methods import build_method, merge_precision, mutual_nearest, planted_metrics  # noqa: E402
from benchmarks.quality_settings import DATASET_SETTINGS, QUICK, MethodSettings, Settings, resolve  # noqa: E402


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
    assert DigitCNN(16, 4, stem_stride=2).features(torch.rand(2, 1, 40, 40)).shape == (2, 16, 3, 3)
    assert ResNet18(8)(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="head"):
        SignalCNN(8, 4, head="conv")


def test_settings_layer_defaults_data_set_quick_and_command_line():
    settings, out, progress = quality.parse_args(["--quick", "--seeds", "4", "5", "--temperature", "0.2"])
    assert settings.epochs == QUICK["epochs"] and settings.methods == QUICK["methods"] and settings.seeds == (4, 5)
    assert settings.method.temperature == 0.2 and settings.method.merge_warmup == QUICK["method"]["merge_warmup"]
    assert settings.method.views == MethodSettings().views and out == Path("results/quality/mnist1d-quick") and progress
    digits = resolve("mnist5k", False, {"epochs": 3, "merge_kwargs": {"backend": "torch"}})
    assert digits.width == 16 and digits.epochs == 3 and digits.method.merge_kwargs == {"backend": "torch"}
    assert MethodSettings().merge_kwargs == {} and MethodSettings().merge_kwargs is not MethodSettings().merge_kwargs


def test_mnist1d_runs_the_merge_settings_chosen_on_its_tuning_data():
    chosen = resolve("mnist1d-tune", False, {}).method
    assert resolve("mnist1d", False, {}).method == chosen
    assert resolve("mnist1d", True, {}).method.merge_kwargs == chosen.merge_kwargs  # the quick run's too
    assert chosen.merge_kwargs["max_group_size"] == 3


def every_setting():
    for cls in (Settings, MethodSettings):
        for field in dataclasses.fields(cls):
            if field.name != "method":
                yield field.name, getattr(cls(), field.name)


def test_help_and_docstring_show_every_setting_with_the_default_the_code_runs(capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, default in every_setting():
        if isinstance(default, tuple):
            shown = " ".join(map(str, default))
        else:
            shown = json.dumps(default) if isinstance(default, dict) else repr(default)
        assert f"--{name.replace('_', '-')}" in text and f"(default: {shown})" in text, name
        assert f"--{name.replace('_', '-')}" in quality.__doc__, name
    assert "--quick changes: methods raw npid full" in text


@pytest.mark.parametrize("seed", range(5))
def test_merge_precision_against_a_plain_count(seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 12, (30,), generator=g)
    groups = torch.where(torch.rand(30, generator=g) < 0.5, torch.arange(30), groups)  # some entries alone
    labels = torch.randint(0, 3, (30,), generator=g)
    members = {}
    for entry, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(labels[entry].item())
    merged = [found for found in members.values() if len(found) > 1]
    agree = sum(max(found.count(label) for label in set(found)) for found in merged)
    expected = agree / sum(map(len, merged)) if merged else 1.0
    result = merge_precision(groups, labels)
    assert result["precision"] == pytest.approx(expected)
    assert result["merged_entries"] == sum(map(len, merged))
    assert result["largest_group"] == max(map(len, members.values()))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """Every method, 2 seeds, 2 epochs on 300 signals, in 2 worker processes; the outputs and what was printed."""
    out = tmp_path_factory.mktemp("quality")
    tiny = load_mnist1d(num_samples=300, seed=3)
    argv = ["--epochs", "2", "--eval-every", "1", "--batch-size", "16", "--seeds", "0", "1", "--workers", "2",
            "--width", "4", "--queue-size", "64", "--xbm-size", "64", "--mochi-hard", "8", "--mochi-mix", "4",
            "--mochi-query-mix", "2", "--mochi-warmup", "1", "--merge-warmup", "1", "--knn-k", "5",
            "--out", str(out), "--no-progress"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality_run, "load_data", lambda settings: tiny)
        printed = []
        patch.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
        assert quality.main(argv) == 0
    return out, json.loads((out / "results.json").read_text()), "\n".join(printed)


def test_every_method_runs_and_writes_its_outputs(tiny_results):
    out, saved, printed = tiny_results
    for name in ("results.json", "results.md", "curves.png", "finals.png", "merging.png"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed
    assert set(saved["summary"]) == {"seen", "unseen"}
    assert set(saved["summary"]["seen"]) == set(Settings().methods)
    full = [r for r in saved["runs"] if r["method"] == "full" and r["protocol"] == "seen"]
    assert len(full) == 2 and len(full[0]["history"]) == 2 and 0 <= full[0]["final"]["knn"] <= 1
    assert "recall@1" in saved["summary"]["unseen"]["xbm"] and "map@r" in saved["summary"]["unseen"]["moco"]
    assert "After 2 epochs on mnist1d (2 seeds), the full method against NPID:" in printed


def test_results_record_provenance_and_every_setting(tiny_results):
    _, saved, _ = tiny_results
    source = saved["provenance"]
    assert len(source["commit"]) == 40 and isinstance(source["dirty"], bool)
    assert source["ssl_memory"] and source["torch"] == torch.__version__ and source["pytorch_metric_learning"]
    assert saved["command"].startswith("python benchmarks/quality.py --epochs 2")
    assert saved["settings"]["epochs"] == 2 and saved["settings"]["method"] == {
        **dataclasses.asdict(MethodSettings()), **DATASET_SETTINGS["mnist1d"]["method"], "queue_size": 64,
        "xbm_size": 64, "mochi_hard": 8, "mochi_mix": 4, "mochi_query_mix": 2, "mochi_warmup": 1, "merge_warmup": 1}


def test_memory_bank_runs_record_merge_rounds_and_the_views_agreement(tiny_results):
    _, saved, _ = tiny_results
    for run in saved["runs"]:
        if run["method"] in ("npid", "npid-4v", "npid-4v-cons", "full"):
            assert run["final"]["views_kl"] >= 0
        if run["method"] != "full":
            assert not run.get("merges")
            continue
        assert run["merges"], "merging from epoch 1 of 2 must run at least one round"
        for round_ in run["merges"]:
            assert round_["epoch"] in (1, 2) and round_["largest_group"] >= 1
            if round_["merged_entries"]:
                assert 0 <= round_["precision"] <= 1
            else:
                assert round_["precision"] is None  # nothing merged: nothing to be right about
            assert round_["report"]["pairs_merged"] >= 0
        assert run["final"]["merged_entries"] == run["merges"][-1]["merged_entries"]


def test_the_report_speaks_plainly(tiny_results):
    out, saved, printed = tiny_results
    markdown = (out / "results.md").read_text()
    assert "| full |" in markdown and "## Findings" in markdown and saved["command"] in markdown
    for text in (markdown, printed, *saved["findings"]):
        assert "issue" not in text.lower() and "NOT" not in text


def summary_of(**means):
    """A summary with one seed: {protocol: {method: {metric: (mean, 0)}}}."""
    return {"seen": {m: {"knn": (v, 0.0), "1nn": (v - 0.01, 0.0), "seconds": (1.0, 0.0)} for m, v in means.items()}}


def test_findings_state_the_goal_each_change_and_the_raw_input():
    settings = Settings(protocols=("seen",), seeds=(0,))
    lines = quality_report.findings(summary_of(raw=0.6, npid=0.70, **{"npid-4v": 0.74, "npid-4v-cons": 0.73}, full=0.76),
                                    settings)
    assert "the full method is +6.0 points over NPID (the goal at full length is +5: reached)" in lines[0]
    assert "views +4.0, consistency -1.0, merging +3.0 points (consistency not adding)" in lines[1]
    assert "the full method (0.760) is above the raw input (0.600)" in lines[2]
    assert lines[-1].startswith("One seed only")
    short = quality_report.findings(summary_of(npid=0.70, full=0.72), Settings(seeds=(0, 1)))
    assert short == [
        "On seen classes (kNN accuracy) the full method is +2.0 points over NPID (the goal at full length is +5: "
        "short by 3.0)."
    ]


@pytest.mark.parametrize("kind, shape", [("signal", (50, 40)), ("image", (50, 1, 28, 28))])
def test_planted_copies_are_near_their_originals_and_kept_as_pairs(kind, shape):
    from benchmarks.datasets import Split

    if kind == "image":  # smooth images, as digits are: a one-pixel shift moves them little
        x = F.interpolate(torch.rand(50, 1, 7, 7), size=(28, 28), mode="bilinear", align_corners=False)
    else:
        x = torch.randn(shape).cumsum(1) / 3  # smooth signals too
    split = Split(x, torch.arange(50) % 5)
    planted, pairs = plant_duplicates(split, 0.2, kind, seed=1)
    again, same = plant_duplicates(split, 0.2, kind, seed=1)
    assert torch.equal(planted.x, again.x) and torch.equal(pairs, same)
    assert pairs.shape == (10, 2) and pairs[:, 0].unique().numel() == 10 and pairs[:, 1].tolist() == list(range(50, 60))
    assert torch.equal(planted.x[:50], x) and torch.equal(planted.y[pairs[:, 1]], planted.y[pairs[:, 0]])
    original, copy = planted.x[pairs[:, 0]].flatten(1), planted.x[pairs[:, 1]].flatten(1)
    assert not torch.equal(original, copy)
    # a copy is closer to its original than the other samples are, on average
    assert (copy - original).norm(dim=1).mean() < torch.cdist(copy, x.flatten(1)).mean()
    if kind == "image":
        assert planted.x.min() >= 0 and planted.x.max() <= 1
    with pytest.raises(ValueError, match="fraction"):
        plant_duplicates(split, 1.5, kind)


@pytest.mark.parametrize("seed", range(4))
def test_planted_metrics_against_plain_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 30
    groups = torch.randint(0, 12, (n,), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    pairs = torch.stack([torch.randperm(20, generator=gen)[:6], torch.arange(20, 26)], 1)
    searched = torch.randn(n, 5, generator=gen)
    origin = list(range(n))
    for a, b in pairs.tolist():
        origin[b] = a
    together = [(i, j) for i in range(n) for j in range(i + 1, n) if groups[i] == groups[j]]
    x = F.normalize(searched, dim=1)
    sims = (x @ x.T).fill_diagonal_(-2)
    nearest = sims.argmax(1).tolist()
    reachable = [(a, b) for a, b in pairs.tolist() if nearest[a] == b and nearest[b] == a]
    found = planted_metrics(groups, labels, pairs, searched)
    sizes = torch.bincount(groups)
    assert found["entries_merged"] == int(sizes[sizes > 1].sum())
    assert found["class_purity"] == pytest.approx(sum(labels[i] == labels[j] for i, j in together) / len(together))
    assert found["planted_precision"] == pytest.approx(sum(origin[i] == origin[j] for i, j in together) / len(together))
    assert found["planted_recall"] == pytest.approx(sum(groups[a] == groups[b] for a, b in pairs.tolist()) / 6)
    expected = sum(groups[a] == groups[b] for a, b in reachable) / len(reachable) if reachable else None
    assert found["reachable_recall"] == (pytest.approx(expected) if reachable else None)
    assert (mutual_nearest(searched) >= 0).sum() % 2 == 0
    assert planted_metrics(torch.arange(n), labels, None, None) == {
        "entries_merged": 0, "class_purity": None, "planted_recall": None, "reachable_recall": None,
        "planted_precision": None,
    }


def test_oracle_needs_planted_pairs_and_starts_with_them_as_groups():
    encoder = SignalCNN(8, 4)
    labels = torch.arange(20) % 2
    with pytest.raises(ValueError, match="--plant-duplicates"):
        build_method("oracle", encoder, labels, 1, MethodSettings(dim=8), torch.Generator())
    pairs = torch.tensor([[0, 18], [3, 19]])
    oracle = build_method("oracle", encoder, labels, 1, MethodSettings(dim=8), torch.Generator(), planted=pairs)
    groups = oracle.criterion.memory.groups
    assert groups[18] == groups[0] == 0 and groups[19] == groups[3] == 3 and int((groups == torch.arange(20)).sum()) == 18


def test_the_full_method_confirms_clean_rounds_in_the_bank_unless_told_not_to():
    encoder, labels = SignalCNN(8, 4), torch.arange(20) % 2
    full = build_method("full", encoder, labels, 1, MethodSettings(dim=8), torch.Generator())
    assert full.merger.ratio == 0.85 and full.merger.bank_ratio == 0.8
    settings = MethodSettings(dim=8, merge_bank_ratio=0.0)
    assert build_method("full", encoder, labels, 1, settings, torch.Generator()).merger.bank_ratio is None


def test_a_planted_run_records_every_rounds_figures_and_the_oracle(tmp_path):
    tiny = load_mnist1d(num_samples=300, seed=3)
    argv = ["--methods", "npid-4v-cons", "full", "oracle", "--plant-duplicates", "0.2", "--epochs", "3",
            "--eval-every", "3", "--batch-size", "16", "--seeds", "0", "--protocols", "seen", "--workers", "1",
            "--width", "4", "--merge-warmup", "1", "--merge-ratio", "1.0", "--merge-bank-ratio", "0", "--knn-k", "5",
            "--merge-kwargs", '{"min_similarity": -1.0}', "--out", str(tmp_path), "--no-progress"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality_run, "load_data", lambda settings: tiny)
        printed = []
        patch.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
        assert quality.main(argv) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    printed = "\n".join(printed)
    assert "20% of the training samples given a planted near-copy" in printed and "planted recall" in printed
    runs = {r["method"]: r for r in saved["runs"]}
    assert all(r["planted_pairs"] == 48 for r in runs.values())  # 20% of the 240 training signals
    assert runs["oracle"]["final"]["planted_recall"] == 1.0 and runs["oracle"]["final"]["planted_precision"] == 1.0
    assert len(runs["full"]["merges"]) == 3
    for round_ in runs["full"]["merges"]:
        assert round_["entries_merged"] == round_["merged_entries"] > 0 and round_["planted_recall"] is not None
        for key in ("class_purity", "planted_recall", "reachable_recall", "planted_precision"):
            assert round_[key] is None or 0 <= round_[key] <= 1
    rounds = saved["summary"]["seen"]["full"]["merge_rounds"]
    assert all("planted_precision" in r and "reachable_recall" in r for r in rounds)
    assert "planted precision" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("search", ["clean", "backbone", "spatial"])
def test_clean_rounds_search_the_embeddings_backbone_features_or_feature_maps_of_the_inputs(search):
    torch.manual_seed(0)
    encoder, labels, inputs = SignalCNN(8, 4), torch.arange(20) % 2, torch.randn(20, 40)
    settings = MethodSettings(dim=8, merge_search=search)
    full = build_method("full", encoder, labels, 1, settings, torch.Generator(), inputs=inputs)
    encoder.eval()
    # The map by hand through the blocks, flattened channel by channel, so that a wrong layer or order shows.
    maps = encoder.features(inputs.unsqueeze(1))
    expected = {"clean": encoder(inputs), "backbone": maps.amax(dim=2), "spatial": maps.reshape(20, -1)}[search]
    encoder.train()
    found = full.clean_embeddings()
    assert found.shape == {"clean": (20, 8), "backbone": (20, 16), "spatial": (20, 16 * 10)}[search]
    assert torch.allclose(found, expected) and encoder.training


@pytest.mark.parametrize(
    "encoder, last_block, head, x, shape",
    [
        (SignalCNN(8, 4), lambda e: e.features[-1], lambda e: e.head, torch.randn(3, 40), (3, 16, 10)),
        (DigitCNN(8, 4), lambda e: e.features[-1], lambda e: e.head, torch.rand(3, 1, 28, 28), (3, 16, 4, 4)),
        (ResNet18(8), lambda e: e.layers[-1], lambda e: e.fc, torch.rand(2, 3, 32, 32), (2, 512, 4, 4)),
    ],
)
def test_feature_map_is_what_the_forward_pass_pools(encoder, last_block, head, x, shape):
    # The last block's output, caught by a hook during an ordinary forward pass, is the reference: the
    # feature map must equal it, and the encoder's output must be its head applied to that map pooled
    # (max over the signal's length, the mean over an image's positions).
    encoder.eval()
    caught = []
    last_block(encoder).register_forward_hook(lambda module, inputs, output: caught.append(output))
    out = encoder(x)
    found = encoder.feature_map(x)
    assert found.shape == shape and torch.allclose(found, caught[0])
    pooled = caught[0].amax(dim=2) if caught[0].dim() == 3 else caught[0].mean(dim=(2, 3))
    assert torch.allclose(out, head(encoder)(pooled), atol=1e-6)


@pytest.mark.parametrize("blocks, shape", [(1, (3, 4, 28, 28)), (2, (3, 8, 14, 14)), (3, (3, 16, 7, 7))])
def test_digit_maps_after_fewer_blocks_are_those_blocks_outputs(blocks, shape):
    # Each block's output, caught by hooks during one ordinary forward pass, is the reference; the method
    # embeds the same map, flattened channel by channel, for its block<k> search space.
    torch.manual_seed(0)
    encoder, x = DigitCNN(8, 4), torch.rand(3, 1, 28, 28)
    encoder.eval()
    caught = []
    for block in encoder.features:
        block.register_forward_hook(lambda module, inputs, output: caught.append(output))
    encoder(x)
    found = encoder.feature_map(x, blocks)
    assert found.shape == shape and torch.allclose(found, caught[blocks - 1])
    full = build_method("full", encoder, torch.arange(3), 1, MethodSettings(dim=8), torch.Generator(), inputs=x)
    assert torch.allclose(full.embed_inputs(f"block{blocks}"), caught[blocks - 1].reshape(3, -1))


def test_merge_rounds_hand_on_round_the_embeddings_backbone_features_maps_and_bank_rows(tiny):
    options = {"epochs": 2, "eval_every": 2, "batch_size": 16, "width": 4, "merge_warmup": 1, "knn_k": 5}
    settings = resolve("mnist1d", False, options)
    kept = []
    quality_run.run_job(settings, ("full", "seen", 0), tiny, on_round=lambda epoch, spaces: kept.append((epoch, spaces)))
    assert [epoch for epoch, _ in kept] == [1, 2]
    n = len(protocol_data(tiny, "seen").train)
    for _, spaces in kept:
        assert {name: tuple(t.shape) for name, t in spaces.items()} == {
            "embeddings": (n, settings.method.dim),
            "backbone": (n, 16),
            "spatial": (n, 16 * 10),
            "bank": (n, settings.method.dim),
        }



def test_planted_image_copies_shift_by_at_most_half_a_pixel():
    from benchmarks.datasets import perturb

    # A bilinear shift by (sy, sx) pixels makes each pixel a weighted sum of its 3x3 neighbours in the original,
    # times the brightness: regressing the copy on the 9 shifted originals gives back |sx| and |sy| exactly,
    # up to the noise, on a textured image (every pixel drawn independently).
    n = 100
    x = 0.2 + 0.6 * torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    copy = perturb(x, "image", torch.Generator().manual_seed(1))[:, 0, 2:-2, 2:-2]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neighbours = torch.stack([x[:, 0, 2 + dy : 26 + dy, 2 + dx : 26 + dx] for dy, dx in offsets], dim=-1)
    shifts = []
    for a, y in zip(neighbours, copy):
        kept = y > 0  # outside the erased patch
        w = torch.linalg.lstsq(a[kept], y[kept].unsqueeze(1)).solution[:, 0]
        total = w.sum()
        sx = sum(w[k] for k, (_, dx) in enumerate(offsets) if dx != 0) / total
        sy = sum(w[k] for k, (dy, _) in enumerate(offsets) if dy != 0) / total
        shifts += [float(sx), float(sy)]
    shifts = torch.tensor(shifts)
    assert shifts.max() <= 0.55 and shifts.min() >= -0.05  # at most half a pixel each way (the noise errs by ~0.01)
    assert (shifts > 0.3).float().mean() > 0.2  # and the copies do move

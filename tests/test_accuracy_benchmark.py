"""The real-data accuracy benchmark: model naming, task design, table arithmetic, and a reduced run."""
import json
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tsvmerge.accuracy import benchmark  # noqa: E402
from tsvmerge.accuracy.__main__ import main as run_accuracy  # noqa: E402
from tsvmerge.accuracy.data import TASKS, broad_augment, load_splits, task_batch  # noqa: E402
from tsvmerge.accuracy.model import Encoder, ViTConfig, open_clip_names  # noqa: E402
from tsvmerge.accuracy.table import absolute, normalized, render, story  # noqa: E402
from tsvmerge.accuracy.train import SCOPES, TrainConfig, build_head, finetune  # noqa: E402


def test_state_dict_uses_open_clip_names():
    names = list(Encoder(ViTConfig(layers=3)).state_dict())
    assert sorted(names) == sorted(open_clip_names(3))
    for name in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                 "visual.ln_pre.weight", "visual.transformer.resblocks.2.attn.in_proj_weight",
                 "visual.transformer.resblocks.2.attn.out_proj.bias", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                 "visual.transformer.resblocks.1.mlp.c_proj.bias", "visual.ln_post.bias", "visual.proj"):
        assert name in names


def test_tasks_are_distinct_and_deterministic():
    assert len(TASKS) >= 8 and len({t.name for t in TASKS}) == len(TASKS)
    test = load_splits()["test"]
    batches = [task_batch(t, test.images, test.digits) for t in TASKS]
    for t, (x, y) in zip(TASKS, batches):
        x2, y2 = task_batch(t, test.images, test.digits)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert int(y.max()) == t.num_classes - 1
    for i in range(len(TASKS)):
        for j in range(i + 1, len(TASKS)):
            same_inputs = torch.equal(batches[i][0], batches[j][0])
            same_labels = torch.equal(batches[i][1], batches[j][1])
            assert not (same_inputs and same_labels), (TASKS[i].name, TASKS[j].name)


def test_splits_are_disjoint_and_fixed():
    a, b = load_splits(), load_splits()
    assert sum(len(s.digits) for s in a.values()) == 1797
    for name in a:
        assert torch.equal(a[name].images, b[name].images)
        assert torch.equal(a[name].index, b[name].index)
    used = torch.cat([s.index for s in a.values()])
    assert len(used.unique()) == 1797  # train, val and test never share an image


PREMISE = {"tasks": 2, "finetuned": 0.65, "zero_shot": 0.4, "relative_norm": 0.02, "relative_norm_max": 0.03,
           "energy_top_k": 0.9, "tsvc_retention": 0.99}


def _row(method, a, b, alpha=1.0, tuned=False):
    return {"method": method, "test": {"a": a, "b": b}, "alpha": alpha, "tuned": tuned}


def test_normalized_accuracy_is_mean_of_ratios():
    names = ["a", "b"]
    ft = _row("Fine-tuned (individual)", 0.8, 0.5, alpha=None)
    merged = _row("TSV-M", 0.6, 0.5)
    assert absolute(merged, names) == pytest.approx(0.55)
    assert normalized(merged, ft["test"], names) == pytest.approx((0.6 / 0.8 + 1.0) / 2)  # 0.875, not 0.55 / 0.65
    table = render({"zoos": {"paper": {"sets": {"2 tasks": {"tasks": names, "rows": [ft, merged]}}, "premise": PREMISE}}})
    assert "| TSV-M | 55.0 / 87.5 |" in table
    assert "| TSV-M (α=1) | 75.0 | 100.0 | 87.5 |" in table
    assert "| paper | 65.0 | 40.0 | 2.0% / 3.0% | 90.0% | 99.0% |" in table


def test_story_ranks_the_merges_and_says_who_loses():
    names = ["a", "b"]
    rows = [_row("Zero-shot (pretrained encoder)", 0.4, 0.4, alpha=None),
            _row("Fine-tuned (individual)", 0.8, 0.8, alpha=None),
            _row("Weight averaging", 0.5, 0.5), _row("Task arithmetic", 0.3, 0.3), _row("TSV-M", 0.7, 0.7),
            _row("TSV-M, randomized SVD", 0.7, 0.696), _row("TSV-M", 0.72, 0.72, alpha=0.7, tuned=True)]
    lines = story({"zoos": {"paper": {"sets": {"2 tasks": {"tasks": names, "rows": rows}}, "premise": PREMISE}}})
    assert lines[0] == ("paper zoo, 2 tasks, normalized accuracy at α = 1: TSV-M 87.5 > Weight averaging 62.5 > "
                        "Task arithmetic 37.5 (zero-shot 50.0).")
    assert "in the paper's regime" in lines[1] and "99.0%" in lines[1]
    assert lines[2].startswith("  Task arithmetic loses most: at α = 1")
    assert lines[2].endswith("below zero-shot: Task arithmetic.")
    assert lines[3] == "  randomized SVD and bf16 compute move TSV-M by at most 0.3 points."
    rows[2] = _row("Weight averaging", 0.75, 0.75)
    rows[3]["step"], rows[4]["step"] = 2.0, 1.5
    lines = story({"zoos": {"paper": {"sets": {"2 tasks": {"tasks": names, "rows": rows}}, "premise": PREMISE}}})
    assert lines[0].split(": ")[1].startswith("Weight averaging 93.8 > TSV-M 87.5")
    assert lines[3] == ("  averaging wins: the other merges add up the 2 tasks' vectors (or their top parts), so at α = 1 "
                        "they move the weights Task arithmetic 2.0×, TSV-M 1.5× as far, and overshoot here.")


def test_broad_augmentation_is_seeded_and_stays_in_range():
    images = load_splits()["train"].images[:50]
    a, b = (broad_augment(images, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == images.shape
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and not torch.equal(a, images)


@pytest.mark.parametrize("scope, optimizer", [("mlp", "adamw"), ("blocks", "sgd"), ("attn", "adamw")])
def test_finetuning_moves_only_its_scope(scope, optimizer):
    cfg = ViTConfig(width=16, layers=2, heads=2, embed_dim=16)
    train = load_splits()["train"]
    train = type(train)(train.images[:96], train.digits[:96], train.index[:96])
    torch.manual_seed(0)
    base = Encoder(cfg)
    task = TASKS[0]
    tuned = finetune(base, build_head(base, task, train), task, train,
                     TrainConfig(finetune_epochs=1, finetune_lr=1e-2, finetune_scope=scope, finetune_optimizer=optimizer), 1)
    before, after = base.state_dict(), tuned.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(SCOPES[scope] in k for k in moved)


@pytest.mark.parametrize("field", ["finetune_scope", "finetune_optimizer", "pretrain_augment"])
def test_recipe_names_are_checked(field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be one of"):
        TrainConfig(**{field: "nonsense"})


@pytest.mark.slow
def test_reduced_benchmark_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys):
    args = ["--zoo", "quick", "--tune-alpha", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert run_accuracy(args) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert first["timing"]["train_s"] > 0
    quick = first["zoos"]["quick"]
    assert set(quick["sets"]) == {"2 tasks", "3 tasks"}
    assert 0.0 < quick["premise"]["energy_top_k"] <= 1.0 and quick["premise"]["relative_norm"] > 0
    for task_set in quick["sets"].values():
        rows = {r["method"]: r for r in task_set["rows"]}
        ft = rows["Fine-tuned (individual)"]["test"]
        assert normalized(rows["Fine-tuned (individual)"], ft, task_set["tasks"]) == pytest.approx(1.0)
        assert {"Weight averaging", "Task arithmetic", "TSV-M", "TSV-M, randomized SVD"} <= set(rows)
        for r in task_set["rows"]:
            assert all(0.0 <= acc <= 1.0 for acc in r["test"].values())
        tuned = [r for r in task_set["rows"] if r["tuned"]]
        assert len(tuned) == len(benchmark.TUNED) and all(r["alpha"] in quick["grid"] for r in tuned)
    for png in ("quick_accuracy_3_tasks.png", "quick_sti_per_layer.png", "quick_task_matrix_spectra.png"):
        assert 0 < os.path.getsize(tmp_path / "out" / png) < 300_000
    assert "Mean accuracy" in (tmp_path / "out" / "table.md").read_text()
    out = capsys.readouterr()
    assert "normalized accuracy at α = 1" in out.out and "time:" in out.out
    assert "it/s" not in out.err and "epoch/s" not in out.err  # no bars when output is not a terminal
    # the second run reads the cached checkpoints and gets the same numbers
    assert run_accuracy(args) == 0
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    assert second["timing"]["train_s"] == 0
    assert second["zoos"]["quick"]["sets"] == quick["sets"]

"""The real-data accuracy benchmark: model naming, task design, table arithmetic, and a reduced run."""
import json
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tsvmerge.accuracy.__main__ import main as run_accuracy  # noqa: E402
from tsvmerge.accuracy.data import TASKS, load_splits, task_batch  # noqa: E402
from tsvmerge.accuracy.model import Encoder, ViTConfig, open_clip_names  # noqa: E402
from tsvmerge.accuracy.table import absolute, normalized, render  # noqa: E402


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


def test_normalized_accuracy_is_mean_of_ratios():
    names = ["a", "b"]
    ft = {"method": "Fine-tuned (individual)", "test": {"a": 0.8, "b": 0.5}, "alpha": None, "tuned": False}
    merged = {"method": "TSV-M", "test": {"a": 0.6, "b": 0.5}, "alpha": 1.0, "tuned": False}
    assert absolute(merged, names) == pytest.approx(0.55)
    assert normalized(merged, ft["test"], names) == pytest.approx((0.6 / 0.8 + 1.0) / 2)  # 0.875, not 0.55 / 0.65
    table = render({"sets": {"2 tasks": {"tasks": names, "rows": [ft, merged]}}})
    assert "| TSV-M | 55.0 | 87.5 | 1 |" in table
    assert "| TSV-M (α=1) | 75.0 | 100.0 | 87.5 |" in table


@pytest.mark.slow
def test_reduced_benchmark_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys):
    args = ["--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert run_accuracy(args) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert first["timing"]["train_s"] > 0
    assert set(first["sets"]) == {"2 tasks", "3 tasks"}
    for task_set in first["sets"].values():
        rows = {r["method"]: r for r in task_set["rows"]}
        ft = rows["Fine-tuned (individual)"]["test"]
        assert normalized(rows["Fine-tuned (individual)"], ft, task_set["tasks"]) == pytest.approx(1.0)
        assert {"Weight averaging", "Task arithmetic", "TSV-M", "TSV-M, randomized SVD"} <= set(rows)
        for r in task_set["rows"]:
            assert all(0.0 <= acc <= 1.0 for acc in r["test"].values())
        tuned = [r for r in task_set["rows"] if r["tuned"]]
        assert tuned and all(r["alpha"] in first["grid"] for r in tuned)
    for png in ("accuracy_3_tasks.png", "sti_per_layer.png", "task_matrix_spectra.png"):
        assert 0 < os.path.getsize(tmp_path / "out" / png) < 300_000
    assert "Mean accuracy" in (tmp_path / "out" / "table.md").read_text()
    # the second run reads the cached checkpoints and gets the same numbers
    assert run_accuracy(args) == 0
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    assert second["timing"]["train_s"] == 0
    assert second["sets"] == first["sets"]

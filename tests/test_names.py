"""Task names matched to the base's across wrapper prefixes (io/names.py), on plain state dicts."""
import pytest
import torch

import tsvmerge
from tsvmerge.io import InputError
from tsvmerge.io.checkpoint import DictCheckpoint
from tsvmerge.io.names import align_names, shared_prefix

from conftest import random_zoo

SHAPES = {"visual.proj": (12, 8), "visual.ln.weight": (8,), "logit_scale": ()}


def test_shared_prefix_takes_wrappers_outermost_first():
    assert shared_prefix(["module.model.a", "module.model.b"]) == "module.model."
    assert shared_prefix(["_orig_mod.vision_model.a"]) == "_orig_mod.vision_model."
    assert shared_prefix(["model.layers.0.w", "lm_head.weight"]) == ""  # an LLM's own names stay
    assert shared_prefix(["encoder.a", "encoder.b"]) == ""                # not a known wrapper


@pytest.mark.parametrize("task_prefix, base_prefix", [
    ("module.", ""), ("module.model.", ""), ("", "model."), ("_orig_mod.", "module."), ("vision_model.", "")])
def test_tasks_under_wrapper_prefixes_merge_under_the_base_names(task_prefix, base_prefix):
    base, tasks = random_zoo(3, 2, SHAPES, dtype=torch.float64)
    want = tsvmerge.merge(base, tasks, backend="reference")
    base = {base_prefix + k: v for k, v in base.items()}
    tasks = [tasks[0], {task_prefix + k: v for k, v in tasks[1].items()}]
    got = tsvmerge.merge(base, tasks, backend="reference")
    assert got.keys() == base.keys()
    assert all(torch.equal(got[base_prefix + k], v) for k, v in want.items())


def test_renamed_task_says_so_and_reads_the_same_tensors():
    base, (task,) = random_zoo(4, 1, SHAPES)
    renamed = align_names(DictCheckpoint({"module." + k: v for k, v in task.items()}), DictCheckpoint(base))
    assert renamed.notes == ["names read under the base's: prefix 'module.' taken as ''"]
    assert list(renamed.infos()) == list(base)
    assert torch.equal(renamed.read("visual.proj"), task["visual.proj"])
    same = DictCheckpoint(task)
    assert align_names(same, DictCheckpoint(base)) is same


def test_other_differences_stay_errors_naming_the_tensor():
    base, (task,) = random_zoo(5, 1, SHAPES)
    missing = {"module." + k: v for k, v in task.items() if k != "logit_scale"}
    with pytest.raises(InputError, match="tensor 'logit_scale': missing"):
        tsvmerge.merge(base, [missing])
    with pytest.raises(InputError, match="missing"):
        tsvmerge.merge(base, [{"backbone." + k: v for k, v in task.items()}])

"""Splitting a merge across processes (`plan.split_by_cost`), from headers alone: every batch on
exactly one rank, whole, in plan order; the same split on every process; shares of about equal
estimated cost on the shapes people merge."""
import functools

import pytest
import torch

from tsvmerge.io import TensorInfo
from tsvmerge.plan import (COPY, SPECTRAL, SPECTRAL_BATCH_LAYERS, MergePlan, classify, merge_rank, plan_groups,
                           share_of, split_by_cost, tensor_cost)
from tsvmerge.zoo import model_shapes


def vit_plan(arch: str, T: int) -> MergePlan:
    """The plan of a TSV merge of T tasks of `arch`'s shapes (no tensor data: the split needs none)."""
    rank = functools.partial(merge_rank, T=T)
    tensors = {n: classify(n, TensorInfo(tuple(s), torch.float32), spectral_rank=rank, exclude=())
               for n, s in model_shapes(arch).items()}
    return MergePlan(None, [None] * T, tensors, plan_groups(tensors, T))


def shares_cost(plan: MergePlan, shares) -> list[float]:
    T = len(plan.tasks)
    return [sum(tensor_cost(plan.tensors[n], T) for b in share for n in b.names) for share in shares]


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_every_batch_on_one_rank_whole_and_in_plan_order(parts):
    plan = vit_plan("ViT-B-32", 8)
    shares = split_by_cost(plan, plan.batches, parts)
    assert len(shares) == parts
    placed = [b for share in shares for b in share]
    assert sorted(map(id, placed)) == sorted(map(id, plan.batches))          # each exactly once, not cut
    for share in shares:
        order = [plan.batches.index(b) for b in share]
        assert order == sorted(order)
        mine = share_of(plan, share)
        assert mine.batches == share and set(mine.tensors) == {n for b in share for n in b.names}
    assert split_by_cost(plan, plan.batches, parts) == shares                # the same on every process


@pytest.mark.parametrize("arch, T, parts, balance", [("ViT-B-32", 8, 2, 0.95), ("ViT-B-32", 8, 3, 0.9),
                                                     ("ViT-L-14", 20, 2, 0.95), ("ViT-L-14", 20, 8, 0.8)])
def test_shares_cost_about_the_same(arch, T, parts, balance):
    plan = vit_plan(arch, T)
    costs = shares_cost(plan, split_by_cost(plan, plan.batches, parts))
    assert min(costs) / max(costs) >= balance, costs


def test_spectral_batches_hold_a_few_layers_so_that_a_merge_splits():
    plan = vit_plan("ViT-B-32", 8)
    spectral = [b for b in plan.batches if b.path == SPECTRAL]
    assert max(len(b.names) for b in spectral) == SPECTRAL_BATCH_LAYERS
    assert len(spectral) >= 4 * 12 // SPECTRAL_BATCH_LAYERS


def test_the_cost_grows_with_the_work():
    T, info = 8, TensorInfo((3072, 768), torch.float32)
    rank = functools.partial(merge_rank, T=T)
    spectral = classify("w", info, spectral_rank=rank, exclude=())
    dense = classify("w", info, spectral_rank=None, exclude=())
    bigger = classify("w", TensorInfo((3072, 1024), torch.float32), spectral_rank=rank, exclude=())
    copied = classify("n", TensorInfo((3072, 768), torch.int64), spectral_rank=rank, exclude=())
    assert copied.path == COPY
    assert tensor_cost(copied, T) < tensor_cost(dense, T) < tensor_cost(spectral, T) < tensor_cost(bigger, T)
    assert tensor_cost(spectral, 2 * T) > tensor_cost(spectral, T) * 0.9

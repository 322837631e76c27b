"""The token-reduction heuristics of `agents.baselines`: Prune-and-Merge-style schedules and the PPT-style rule."""

from dataclasses import replace

import pytest
import torch
from conftest import images, tiny_supernet

import vit
from agents.baselines import PPTHeuristic, PruneMergeSchedule
from agents.evaluation import static_method


def supernet(token_mode: str = "merge") -> vit.ElasticViT:
    """A 4-block tiny supernet with perturbed weights (images differ), in eval mode."""
    model = tiny_supernet(token_mode, depth=4, keep_ratio_choices=(0.5, 0.75, 1.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def schedule(model: vit.ElasticViT, prune: float, merge: float, start: int) -> vit.Subnet:
    """Full widths, from block `start` on pruning to `prune` and merging to `merge`."""
    return vit.Subnet(
        tuple(
            replace(c, keep_ratio=prune, merge_ratio=merge) if i >= start else c
            for i, c in enumerate(model.search_space.largest())
        )
    )


@pytest.mark.parametrize("prune, merge, start", [(0.75, 0.5, 0), (0.5, 1.0, 1), (1.0, 0.75, 2)])
def test_a_prune_merge_schedule_runs_the_supernet_as_one_trained_to_prune_then_merge(prune, merge, start):
    model = supernet()  # trained (here: built) to merge only
    both = tiny_supernet(
        "prune_merge", depth=4, merge_ratio_choices=(0.5, 0.75, 1.0), keep_ratio_choices=(0.5, 0.75, 1.0)
    )
    both.load_state_dict(model.state_dict())
    x = images(model, 6)
    outcome = PruneMergeSchedule(model, prune, merge, start)(x)
    subnet = schedule(both, prune, merge, start)
    torch.testing.assert_close(outcome.logits, both(x, subnet), atol=1e-5, rtol=0)
    assert torch.all(outcome.macs == vit.count_macs(both, subnet))
    assert outcome.subnets == [model.search_space.largest()] * 6  # full widths: the parameters read
    if prune == 1.0:  # pure merging is the merging supernet's own uniform subnet
        uniform = vit.Subnet(tuple(replace(c, merge_ratio=1.0) for c in schedule(model, merge, 1.0, start)))
        static = static_method(model, uniform)(x)
        torch.testing.assert_close(outcome.logits, static.logits, atol=1e-5, rtol=0)
        assert torch.equal(outcome.macs, static.macs) and torch.equal(outcome.tokens, static.tokens)


def test_ppt_prunes_the_images_whose_cls_attention_varies_most_and_merges_the_others():
    model = supernet()
    x = images(model, 16)
    depth, start, r = model.depth, 1, 0.5
    overhead = torch.zeros(16, dtype=torch.float64)
    for thresholds, prune, merge in (([-1.0] * depth, r, 1.0), ([float("inf")] * depth, 1.0, r)):
        ppt = PPTHeuristic(model, r, start, thresholds)(x)  # every image pruned, then every image merged
        fixed = PruneMergeSchedule(model, prune, merge, start)(x)
        torch.testing.assert_close(ppt.logits, fixed.logits, atol=1e-5, rtol=0)
        overhead = ppt.macs.double() - fixed.macs.double()
        assert torch.all(overhead > 0) and len(overhead.unique()) == 1  # the variance's keys and query, counted
    ppt = PPTHeuristic(model, r, start).calibrate([x])
    assert ppt.thresholds[0] == float("inf") and all(t < float("inf") for t in ppt.thresholds[start:])
    entering = model.run_block(0, vit.PackedBatch(model.embed(x)), model.search_space.largest()[0]).dense()[0]
    variance = ppt.variance(start, entering, None)[0]
    assert (variance > ppt.thresholds[start]).sum() == 8  # the median: half of the images prune at the first block
    outcome = ppt(x)
    macs = outcome.macs.double() - overhead
    pruned, merged = (PruneMergeSchedule(model, *ratios, start)(x) for ratios in ((r, 1.0), (1.0, r)))
    assert len(macs.unique()) > 1  # images took different paths
    for b in range(16):  # each image alone gives what it gives in the batch: per image, not per batch
        alone = ppt(x[b : b + 1])
        torch.testing.assert_close(alone.logits, outcome.logits[b : b + 1], atol=1e-5, rtol=0)
        assert alone.macs == outcome.macs[b]
    assert torch.all((macs >= pruned.macs.double().min()) & (macs <= merged.macs.double().max()))


def test_heuristics_refuse_bad_settings_and_ppt_needs_thresholds():
    model = supernet()
    with pytest.raises(ValueError, match="keep rates"):
        PruneMergeSchedule(model, 0.0, 0.5)
    with pytest.raises(ValueError, match="start"):
        PruneMergeSchedule(model, 0.5, 0.5, start=4)
    with pytest.raises(ValueError, match="keep_ratio"):
        PPTHeuristic(model, 1.5)
    with pytest.raises(ValueError, match="one threshold per block"):
        PPTHeuristic(model, 0.5, thresholds=[0.0])
    with pytest.raises(RuntimeError, match="calibrate"):
        PPTHeuristic(model, 0.5)(images(model, 2))
    with pytest.raises(ValueError, match="quantile"):
        PPTHeuristic(model, 0.5).calibrate([images(model, 2)], quantile=2.0)

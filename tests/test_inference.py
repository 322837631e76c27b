"""vit.inference: the block-by-block loop gives the supernet's per-sample results and counts their MACs exactly."""

import random

import pytest
import torch
from conftest import tiny_supernet

import vit
from vit.inference import InferenceLoop, LoopShape


@pytest.mark.parametrize("execution", ["packed", "bucketed"])
@pytest.mark.parametrize("stem_blocks, blocks_per_step", [(1, 1), (0, 2), (2, 1)])
def test_the_loop_runs_per_sample_subnets_as_the_supernet_does(execution, stem_blocks, blocks_per_step):
    model = tiny_supernet(depth=4).eval()
    space, rng = model.search_space, random.Random(0)
    images = torch.randn(5, 1, 28, 28)
    loop = InferenceLoop(model, LoopShape(stem_blocks, blocks_per_step), execution)
    assert loop.num_steps == (4 - stem_blocks) // blocks_per_step
    loop.start(images)
    while not loop.done:
        block = loop.next_block
        # the completion from here costs what the subnet decided so far, then at the reference, costs in full
        expected = [vit.count_flops(model, vit.Subnet(tuple(c) + tuple(loop.reference[block:]))) for c in loop.choices]
        assert (loop.macs + loop.completion_macs()).tolist() == expected
        configs = [space.config(block, [rng.randrange(n) for n in loop.nvec]) for _ in range(5)]
        loop.advance(configs)
        assert list(loop.shape.blocks(loop.step_index - 1)) == list(range(block, block + blocks_per_step))
    subnets = [vit.Subnet(tuple(c)) for c in loop.choices]
    assert len(set(subnets)) > 1
    with torch.no_grad():
        torch.testing.assert_close(loop.complete(), model(images, subnets), atol=1e-5, rtol=0)
    assert loop.macs.tolist() == vit.count_flops(model, subnets)
    assert loop.completion_macs().tolist() == [0.0] * 5


def test_the_loop_leaves_the_model_as_it_was():
    model = tiny_supernet().train()
    loop = InferenceLoop(model)
    loop.start(torch.randn(2, 1, 28, 28))
    loop.advance([loop.reference[1]] * 2)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_loop_shape_checks_the_blocks():
    assert LoopShape(1, 3).num_steps(7) == 2 and LoopShape(1, 3).blocks(1) == range(4, 7)
    with pytest.raises(ValueError, match="multiple of blocks_per_step"):
        LoopShape(1, 2).num_steps(4)
    with pytest.raises(ValueError, match="stem_blocks"):
        LoopShape(-1, 1)
    loop = InferenceLoop(tiny_supernet())
    with pytest.raises(RuntimeError, match="start"):
        loop.advance([loop.reference[1]])
    loop.start(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="expected 2 configurations"):
        loop.advance([loop.reference[1]])

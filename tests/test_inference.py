"""vit.inference: the runner gives the supernet's per-sample results on explicit states and counts their MACs
exactly."""

import random
import warnings

import pytest
import torch
from conftest import tiny_supernet

import vit
from vit.inference import DecisionSchedule, InferenceRunner


@pytest.mark.parametrize("layout", ["packed", "bucketed"])
@pytest.mark.parametrize("stem_blocks, blocks_per_step", [(1, 1), (0, 2), (2, 1)])
def test_the_runner_runs_per_sample_subnets_as_the_supernet_does(layout, stem_blocks, blocks_per_step):
    model = tiny_supernet(depth=4).eval()
    space, rng = model.search_space, random.Random(0)
    images = torch.randn(5, 1, 28, 28)
    runner = InferenceRunner(model, DecisionSchedule(stem_blocks, blocks_per_step), layout)
    nvec = space.num_choices(0)
    state = runner.start(images)
    assert state.num_steps == (4 - stem_blocks) // blocks_per_step
    while not state.done:
        block = state.next_block
        # the completion from here costs what the subnet decided so far, then at the reference, costs in full
        rest = tuple(runner.reference[block:])
        expected = [vit.count_macs(model, vit.Subnet(c + rest)) for c in state.subnets()]
        assert (state.macs + runner.completion_macs(state)).tolist() == expected
        configs = [space.config(block, [rng.randrange(n) for n in nvec]) for _ in range(5)]
        before = state
        state = runner.advance(state, configs)
        assert state.next_block == block + blocks_per_step and before.next_block == block  # the state given stays
    subnets = [vit.Subnet(c) for c in state.subnets()]
    assert len(set(subnets)) > 1
    with torch.no_grad():
        torch.testing.assert_close(runner.complete(state), model(images, subnets), atol=1e-5, rtol=0)
    assert state.macs.tolist() == vit.count_macs(model, subnets)
    assert runner.completion_macs(state).tolist() == [0.0] * 5


def test_a_state_can_be_completed_from_anywhere_and_run_on():
    """Branching is free: completing a state leaves it as it was, so the same state runs on to the same end."""
    model = tiny_supernet(depth=3).eval()
    runner = InferenceRunner(model)
    state = runner.start(torch.randn(3, 1, 28, 28))
    smallest = [model.search_space.smallest()[1]] * 3
    first = runner.advance(state, smallest)
    runner.complete(first)
    again = runner.advance(state, smallest)
    assert torch.equal(first.tokens.x, again.tokens.x) and torch.equal(first.macs, again.macs)


def test_the_runner_leaves_the_model_as_it_was():
    model = tiny_supernet().train()
    runner = InferenceRunner(model)
    state = runner.start(torch.randn(2, 1, 28, 28))
    runner.advance(state, [runner.reference[1]] * 2)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_the_schedule_and_the_runner_check_their_input():
    assert DecisionSchedule(1, 3).num_steps(7) == 2 and DecisionSchedule(1, 3).blocks(1) == range(4, 7)
    with pytest.raises(ValueError, match="multiple of blocks_per_step"):
        DecisionSchedule(1, 2).num_steps(4)
    with pytest.raises(ValueError, match="stem_blocks"):
        DecisionSchedule(-1, 1)
    runner = InferenceRunner(tiny_supernet())
    state = runner.start(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="expected 2 configurations"):
        runner.advance(state, [runner.reference[1]])
    done = runner.advance(state, [runner.reference[1]] * 2)
    with pytest.raises(RuntimeError, match="done"):
        runner.advance(done, [runner.reference[1]] * 2)
    with pytest.raises(ValueError, match="unknown layout"):
        InferenceRunner(tiny_supernet(), layout="consensus")


def test_old_names_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning, match="DecisionSchedule"):
        assert vit.LoopShape is DecisionSchedule
    model = tiny_supernet()
    with pytest.warns(DeprecationWarning, match="count_macs"):
        assert vit.count_flops(model) == vit.count_macs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vit.count_macs(model)  # the new names warn nothing

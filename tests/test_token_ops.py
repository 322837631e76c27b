"""Token reduction on hand-checkable inputs: kept counts, schedules, ranking and assignment, pruning, merging,
proportional attention."""

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_reduce

from vit import TOKEN_MODES, BlockConfig
from vit.packed import AttentionRun, attention_core
from vit.token_ops import assign_tokens, cls_attention, kept_tokens, token_schedule


def prune(x, size, scores, k):
    """Keep CLS and the k patch tokens of highest score; also return the kept patch positions."""
    keep = (assign_tokens(scores, None, k, k) >= 0).nonzero()[:, 1].view(x.shape[0], k)
    return *dense_reduce(x, size, scores, None, (k, k)), keep


def merge(x, size, scores, keys, k, source=None):
    """Merge the patch tokens into the k of highest score."""
    return dense_reduce(x, size, scores, keys, (x.shape[1] - 1, k), source=source)


def tokens(batch: int, n: int, dim: int) -> torch.Tensor:
    """(batch, 1 + n, dim) tokens whose values are all distinct: token j of sample b holds 100 b + j + offsets."""
    base = torch.arange(1 + n, dtype=torch.float32)[None, :, None] + 100 * torch.arange(batch)[:, None, None]
    return base + 0.01 * torch.arange(dim, dtype=torch.float32)


# --- kept_tokens --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        (10, 1.0, 10),  # ratio 1 keeps everything
        (10, 0.5, 5),
        (10, 0.62, 6),  # 6.2 rounds down
        (10, 0.66, 7),  # 6.6 rounds up
        (5, 0.5, 3),  # 2.5: halves round up
        (7, 0.5, 4),  # 3.5: halves round up
        (10, 0.25, 3),  # 2.5: halves round up
        (49, 0.6, 29),  # 29.4
        (196, 0.7, 137),  # 137.2
        (10, 0.01, 1),  # at least one patch token survives
        (1, 0.5, 1),
        (3, 0.9, 3),  # 2.7 rounds to all three
    ],
)
def test_kept_tokens(n, ratio, expected):
    assert kept_tokens(n, ratio) == expected


@pytest.mark.parametrize("n, ratio, expected", [(45, 0.7, 32), (85, 0.7, 60), (90, 0.35, 32)])
def test_kept_tokens_rounds_decimal_halves_up(n, ratio, expected):
    """ratio * n is exactly x.5 in decimal (0.7 * 45 = 31.5) but just below it in binary floating point."""
    assert kept_tokens(n, ratio) == expected


# --- token_schedule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token_mode, keep_ratio, merge_ratio, expected",
    [
        ("prune", 0.5, 1.0, (5, 5)),  # pruning only: both stages at the pruned count
        ("merge", 0.5, 1.0, (10, 5)),  # merging only: nothing pruned, merged down to 5
        ("prune_merge", 0.5, 0.6, (5, 3)),  # prune 10 -> 5, then merge 5 -> 3
        ("prune_merge", 1.0, 0.5, (10, 5)),  # merge only
        ("prune_merge", 0.5, 1.0, (5, 5)),  # prune only
        ("prune", 1.0, 1.0, (10, 10)),
        ("merge", 1.0, 1.0, (10, 10)),
        ("prune_merge", 1.0, 1.0, (10, 10)),
    ],
)
def test_token_schedule(token_mode, keep_ratio, merge_ratio, expected):
    config = BlockConfig(heads=1, mlp_hidden=4, keep_ratio=keep_ratio, merge_ratio=merge_ratio)
    assert token_schedule(10, config, token_mode) == expected


# --- prune --------------------------------------------------------------------------------------------------------


def test_prune_keeps_cls_and_top_k_in_position_order():
    x = tokens(2, 5, 3)
    size = torch.tensor([[1.0, 1, 2, 3, 4, 5], [1, 6, 7, 8, 9, 10]])
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2], [0.8, 0.1, 0.7, 0.2, 0.6]])
    out, out_size, keep = prune(x, size, scores, k=2)
    # sample 0: the top two are patches 3 (0.9) and 1 (0.5); sample 1: patches 0 (0.8) and 2 (0.7)
    assert keep.tolist() == [[1, 3], [0, 2]]
    torch.testing.assert_close(out[0], x[0, [0, 2, 4]])
    torch.testing.assert_close(out[1], x[1, [0, 1, 3]])
    assert out_size.tolist() == [[1, 2, 4], [1, 6, 8]]


def test_prune_without_sizes_and_breaks_ties_by_position():
    x = tokens(1, 4, 2)
    out, out_size, keep = prune(x, None, torch.zeros(1, 4), k=2)
    assert out_size is None
    assert keep.tolist() == [[0, 1]]
    torch.testing.assert_close(out, x[:, :3])


# --- merge --------------------------------------------------------------------------------------------------------


def test_merge_into_most_similar_destination():
    x = tokens(1, 4, 2)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2]])  # destinations: patches 0 and 2
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])  # 1 is like 0, 3 is like 2
    out, size = merge(x, None, scores, keys, k=2)
    assert size.tolist() == [[1, 2, 2]]
    expected = torch.stack([x[0, 0], (x[0, 1] + x[0, 2]) / 2, (x[0, 3] + x[0, 4]) / 2])
    torch.testing.assert_close(out[0], expected)


def test_merge_is_weighted_by_size():
    x = tokens(1, 4, 2)
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0]])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    out, out_size = merge(x, size, scores, keys, k=2)
    assert out_size.tolist() == [[1, 4, 3]]
    expected = torch.stack([x[0, 0], (3 * x[0, 1] + x[0, 2]) / 4, (x[0, 3] + 2 * x[0, 4]) / 3])
    torch.testing.assert_close(out[0], expected)


def test_merge_with_identical_keys_goes_to_the_first_destination():
    x = tokens(1, 4, 2)
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8]])  # destinations: patches 1 and 3
    out, size = merge(x, None, scores, torch.ones(1, 4, 3), k=2)
    assert size.tolist() == [[1, 3, 1]]
    expected = torch.stack([x[0, 0], (x[0, 1] + x[0, 2] + x[0, 3]) / 3, x[0, 4]])
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_merge_conserves_size_and_mass(k):
    """Sizes sum to the tokens merged, and every merged token is the size-weighted mean of its members."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 13, 8, generator=g)
    size = torch.randint(1, 5, (3, 13), generator=g).float()
    out, out_size = merge(x, size, torch.rand(3, 12, generator=g), torch.randn(3, 12, 6, generator=g), k)
    assert out.shape == (3, 1 + k, 8) and out_size.shape == (3, 1 + k)
    torch.testing.assert_close(out_size.sum(1), size.sum(1))
    torch.testing.assert_close((out * out_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out_size[:, 0], size[:, 0])


# --- a dense batch's reduction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token_mode, patches, total_size", [("prune", 5, None), ("merge", 5, 11.0), ("prune_merge", 3, 6.0)]
)
def test_a_dense_reduction_per_mode(token_mode, patches, total_size):
    """10 patches at keep 0.5 (and merge 0.6): pruning drops tokens, merging keeps their mass in the sizes."""
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 11, 4, generator=g), torch.rand(2, 10, generator=g)
    keys = torch.randn(2, 10, 8, generator=g)
    config = BlockConfig(heads=1, mlp_hidden=4, keep_ratio=0.5, merge_ratio=0.6)
    out, size = dense_reduce(x, None, scores, keys, token_schedule(10, config, token_mode))
    assert out.shape == (2, 1 + patches, 4)
    if total_size is None:
        assert size is None
    else:
        assert size.sum(1).tolist() == [total_size, total_size]


@pytest.mark.parametrize("token_mode", TOKEN_MODES)
def test_a_dense_reduction_is_identity_at_ratio_one(token_mode):
    x = torch.randn(2, 11, 4)
    schedule = token_schedule(10, BlockConfig(heads=1, mlp_hidden=4), token_mode)
    out, size = dense_reduce(x, None, torch.rand(2, 10), torch.randn(2, 10, 8), schedule)
    assert size is None
    assert torch.equal(out, x)


# --- source tracing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_mode", TOKEN_MODES)
@pytest.mark.parametrize("keep_ratio, merge_ratio", [(0.5, 0.6), (0.3, 1.0), (1.0, 0.4), (1.0, 1.0)])
def test_source_is_reduced_as_the_tokens_are(token_mode, keep_ratio, merge_ratio):
    """With a source, tokens and sizes are unchanged; the source maps every original token to at most one token
    (exactly one unless pruned), its row sums are the sizes, and each token is the size-weighted mean of its
    original tokens."""
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(3, 11, 4, generator=g), torch.rand(3, 10, generator=g)
    keys = torch.randn(3, 10, 8, generator=g)
    schedule = token_schedule(10, BlockConfig(1, 4, keep_ratio, merge_ratio), token_mode)
    source = torch.eye(11).expand(3, -1, -1)
    out, size, out_source = dense_reduce(x, None, scores, keys, schedule, source)
    expected = dense_reduce(x, None, scores, keys, schedule)
    assert torch.equal(out, expected[0])
    assert (size is None and expected[1] is None) or torch.equal(size, expected[1])
    assert out_source.shape == (3, 1 + schedule[1], 11)
    held = out_source.sum(1)  # (B, 11): how many tokens hold each original token
    assert set(held.unique().tolist()) <= {0.0, 1.0} and torch.all(held[:, 0] == 1)
    assert held.sum(1).tolist() == [1 + schedule[0]] * 3  # the pruned ones are held by none
    rows = out_source.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows) if size is None else size, atol=0, rtol=0)
    torch.testing.assert_close(out, out_source @ x / rows[..., None])


def test_merge_sums_the_sources_of_merged_tokens():
    x = tokens(1, 4, 2)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2]])  # destinations: patches 0 and 2
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])  # 1 is like 0, 3 is like 2
    _, size, source = merge(x, None, scores, keys, 2, torch.eye(5)[None])
    assert source.tolist() == [[[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]]]
    assert size.tolist() == [[1, 2, 2]]


# --- proportional attention ---------------------------------------------------------------------------------------


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    """A merged token of size s attends (and is attended to) like s copies of itself."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))  # (B, h, T, d): CLS + 3 patches
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    copies = torch.tensor([0, 1, 1, 1, 2, 3, 3])  # token j repeated size[j] times
    scale = 8**-0.5

    qkv = torch.stack([q[0], k[0], v[0]]).permute(2, 0, 1, 3).reshape(4, 3 * 2 * 8)  # (T, 3 h d), as the block
    out = attention_core(AttentionRun(qkv, 2, 0, [0], [4]), size[0].log(), 8)  # (T, h d)
    dup = F.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])  # (B, h, T, d)
    torch.testing.assert_close(out, dup[0].transpose(0, 1).reshape(4, 16))

    scores = cls_attention(q[:, :, 0], k, scale, size.log())  # (1, 3): attention to the patch tokens
    dup_scores = cls_attention(q[:, :, 0], k[:, :, copies], scale)  # (1, 6)
    merged = torch.stack([dup_scores[:, :3].sum(1), dup_scores[:, 3], dup_scores[:, 4:].sum(1)], dim=1)
    torch.testing.assert_close(scores, merged)


def test_cls_attention_is_the_head_mean_of_the_cls_row():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    expected = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(cls_attention(q[:, :, 0], k, 0.5), expected)


def test_cls_attention_of_fewer_heads_and_padding_is_that_of_the_sample_alone():
    """Heads a sample does not run and padded keys (bias -inf) change nothing of its CLS attention."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    bias = torch.zeros(2, 6)
    bias[1, 4:] = float("-inf")  # sample 1 holds 4 tokens, padded to 6
    scores = cls_attention(q[:, :, 0], k, 0.5, bias, heads=torch.tensor([3, 2]))
    torch.testing.assert_close(scores[0], cls_attention(q[:1, :, 0], k[:1], 0.5)[0])
    torch.testing.assert_close(scores[1, :3], cls_attention(q[1:, :2, 0], k[1:, :2, :4], 0.5)[0])
    assert torch.all(scores[1, 3:] == 0)


# --- assign_tokens ------------------------------------------------------------------------------------------------


def test_assign_tokens_slots_kept_merged_and_pruned_tokens():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.05]])  # ranks: 0, 3, 1, 2, 4
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 0.0]]])
    # keep the best 2 (slots 0 and 1 in position order), merge ranks 2-3 into their most similar, prune rank 4
    assert assign_tokens(scores, keys, 4, 2).tolist() == [[0, 0, 1, 1, -1]]
    assert assign_tokens(scores, None, 3, 3).tolist() == [[0, -1, 1, 2, -1]]  # pruning only needs no keys


def test_assign_tokens_on_padded_samples_is_each_sample_alone():
    """Per-sample counts and padding: every sample gets the slots it gets alone, padding none."""
    g = torch.Generator().manual_seed(3)
    n, pruned, final = [9, 6, 4], [7, 6, 2], [3, 2, 2]
    scores, keys = torch.rand(3, 9, generator=g), torch.randn(3, 9, 5, generator=g)
    valid = torch.arange(9) < torch.tensor(n)[:, None]
    slot = assign_tokens(scores, keys, torch.tensor(pruned), torch.tensor(final), valid)
    for b in range(3):
        alone = assign_tokens(scores[b : b + 1, : n[b]], keys[b : b + 1, : n[b]], pruned[b], final[b])
        assert slot[b, : n[b]].tolist() == alone[0].tolist()
        assert torch.all(slot[b, n[b] :] == -1)

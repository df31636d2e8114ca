import torch
from torch.testing import assert_close

from edgeprune.analysis.scores import block_influence, group_scores, head_output_norms, select_heads


def test_block_influence_known_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    same = block_influence(x, 5 * x)
    assert_close(same, torch.zeros(3, dtype=torch.float64))
    ortho = block_influence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert_close(ortho, torch.ones(1, dtype=torch.float64))
    opposite = block_influence(torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -1.0]]))
    assert_close(opposite, torch.full((1,), 2.0, dtype=torch.float64))


def test_head_output_norms_equal_direct_computation():
    torch.manual_seed(0)
    hidden, n_head, d = 6, 3, 4
    w = torch.randn(hidden, n_head * d)
    x = torch.randn(2, 5, n_head * d)  # batch, tokens, heads * d
    got = head_output_norms(w, x, d)
    flat = x.reshape(-1, n_head * d)
    for h in range(n_head):
        direct = (flat[:, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T).norm(dim=-1)
        assert_close(got[:, h], direct.double())
    # The heads' contributions sum to the o_proj output.
    assert got.shape == (10, n_head)


def test_select_heads_keeps_gqa_groups_consistent():
    # 6 query heads, 2 KV groups of 3. Group 1 is stronger overall.
    scores = torch.tensor([5.0, 0.1, 0.2, 3.0, 3.0, 3.0])
    assert_close(group_scores(scores, 2), torch.tensor([5.3, 9.0]))
    assert select_heads(scores, 2, keep_groups=1, keep_per_group=3) == (3, 4, 5)
    assert select_heads(scores, 2, keep_groups=2, keep_per_group=1) == (0, 3)
    kept = select_heads(scores, 2, keep_groups=2, keep_per_group=2)
    assert kept == (0, 2, 3, 4)
    groups = [h // 3 for h in kept]
    assert groups.count(0) == groups.count(1) == 2


def test_channel_output_norms_equal_direct_computation():
    from edgeprune.analysis.scores import channel_output_norms, select_channels

    torch.manual_seed(0)
    w = torch.randn(6, 10)  # hidden x ffn
    x = torch.randn(2, 3, 10)
    got = channel_output_norms(w, x)
    flat = x.reshape(-1, 10)
    for c in range(10):
        direct = torch.outer(flat[:, c], w[:, c]).norm(dim=-1)
        assert_close(got[:, c], direct.double())
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert select_channels(scores, 2) == (1, 3)
    assert select_channels(scores, 0) == ()

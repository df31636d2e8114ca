import torch
from torch.testing import assert_close

from edgeprune.analysis.scores import block_influence, group_scores, select_heads


def test_block_influence_known_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    same = block_influence(x, 5 * x)
    assert_close(same, torch.zeros(3, dtype=torch.float64))
    ortho = block_influence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert_close(ortho, torch.ones(1, dtype=torch.float64))
    opposite = block_influence(torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -1.0]]))
    assert_close(opposite, torch.full((1,), 2.0, dtype=torch.float64))


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


def test_select_channels_keeps_the_highest_scores():
    from edgeprune.analysis.scores import select_channels

    scores = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert select_channels(scores, 2) == (1, 3)
    assert select_channels(scores, 0) == ()

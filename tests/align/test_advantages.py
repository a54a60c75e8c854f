import math

import torch

from align.advantages import get_advantage


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv, m = get_advantage("grpo")(r)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.all(adv[1] == 0) and m["adv/zero_std_frac"] == 0.5


def test_dr_grpo_and_rloo_by_hand():
    r = torch.tensor([[3.0, 1.0, 2.0]])
    assert torch.allclose(get_advantage("dr_grpo")(r)[0], torch.tensor([[1.0, -1.0, 0.0]]))
    # RLOO: 3 - mean(1,2) = 1.5; 1 - 2.5 = -1.5; 2 - 2 = 0
    assert torch.allclose(get_advantage("rloo")(r)[0], torch.tensor([[1.5, -1.5, 0.0]]))


def test_unscorable_samples_are_excluded():
    r = torch.tensor([[1.0, float("nan"), 0.0]])
    adv, m = get_advantage("dr_grpo")(r)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0, -0.5]])) and m["adv/unscorable"] == 1


def test_vectorized_equals_loop():
    r = torch.rand(5, 6)
    adv, _ = get_advantage("grpo")(r)
    for i in range(5):
        assert torch.allclose(adv[i], (r[i] - r[i].mean()) / (r[i].std() + 1e-4), atol=1e-6)

import math

import pytest
import torch

from align.losses import aggregate, get_loss, kl_penalty, mismatch_metrics, tis_weights
from trl_reference import trl_loss


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 7, generator=g)
    old = logp + 0.15 * torch.randn(6, 7, generator=g)
    ref = logp + 0.2 * torch.randn(6, 7, generator=g)
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.3).float()
    mask[:, 0] = 1
    return logp, old, ref, adv, mask


def test_single_token_by_hand():
    logp, old = torch.tensor([[math.log(0.6)]]), torch.tensor([[math.log(0.4)]])
    mask = torch.ones(1, 1)
    # ratio 1.5 clipped to 1.2 for A=+1: loss = -1.2 ; for A=-1: -min(-1.5, -1.2) = 1.5
    assert get_loss("grpo")(logp, old, torch.tensor([1.0]), mask)[0].item() == pytest.approx(-1.2)
    loss, m = get_loss("grpo")(logp, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(1.5) and float(m["actor/clipfrac"]) == 0.0
    # metrics stay on the device (0-d tensors, no grad): reading them is the caller's one host sync
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in m.values())
    assert get_loss("dapo")(logp, old, torch.tensor([1.0]), mask, epsilon_high=0.28)[0].item() == pytest.approx(-1.28)


@pytest.mark.parametrize("ours, theirs, kw", [
    ("grpo", "grpo", {}),
    ("dr_grpo", "dr_grpo", {}),
    ("dapo", "dapo", {"eps_high": 0.28}),
])
def test_matches_trl(tensors, ours, theirs, kw):
    logp, old, ref, adv, mask = tensors
    for beta in (0.0, 0.04):
        expected = trl_loss(theirs, logp, old, adv, mask, ref_logp=ref, beta=beta, **kw)
        got, _ = get_loss(ours)(logp, old, adv, mask, ref_logp=ref, beta=beta, epsilon=0.2,
                                epsilon_high=kw.get("eps_high", 0.2))
        torch.testing.assert_close(got, expected)


def test_gspo_matches_trl_sequence_level(tensors):
    logp, old, _, adv, mask = tensors
    expected = trl_loss("grpo", logp, old, adv, mask, level="sequence", eps_low=3e-4, eps_high=4e-4)
    torch.testing.assert_close(get_loss("gspo")(logp, old, adv, mask)[0], expected)


def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(x, m, "seq_mean_token_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(x, m, "token_mean").item() == pytest.approx(10.0 / 4)
    assert aggregate(x, m, "seq_mean_token_sum_norm", max_len=5).item() == pytest.approx(10.0 / 10)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(2)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(d * d / 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + d)


def test_tis_and_mismatch():
    old, roll = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    assert torch.allclose(tis_weights(old, roll, cap=2.0), torch.tensor([[2.0, 1.0]]))
    m = mismatch_metrics(old, roll, torch.ones(1, 2))
    assert float(m["mismatch/abs_logp_mean"]) == pytest.approx(0.5)
    assert float(m["mismatch/abs_logp_max"]) == pytest.approx(1.0)
    # a masked token's difference (3) enters neither the mean nor the max
    m = mismatch_metrics(torch.tensor([[0.0, -1.0, 2.0]]), torch.tensor([[-1.0, -1.0, -1.0]]),
                         torch.tensor([[1.0, 1.0, 0.0]]))
    assert float(m["mismatch/abs_logp_mean"]) == pytest.approx(0.5)
    assert float(m["mismatch/abs_logp_max"]) == pytest.approx(1.0)
    assert float(mismatch_metrics(old, roll, torch.zeros(1, 2))["mismatch/abs_logp_max"]) == 0.0

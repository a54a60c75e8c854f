import math

import torch

from align.config import LoraConfig, ModelConfig
from align.moe import ExpertMonitor, RouterReplay, balance_stats, device_balance_loss, expert_balance_loss
from align.policy import load_policy


def test_expert_loss_matches_hand_computation():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    idx = torch.tensor([[0, 1], [3, 2]])
    # f_i = E/(K T) * count = 4/(2*2) * [1,1,1,1] = 1 ; P = [0.3, 0.25, 0.2, 0.25] -> sum f*P = 1.0
    assert expert_balance_loss(probs, idx, 4).item() == torch.tensor(1.0).item()
    idx = torch.tensor([[0, 1], [0, 1]])
    # f = [2, 2, 0, 0]; P = [0.3, 0.25, .2, .25] -> 2*0.3 + 2*0.25 = 1.1
    assert math.isclose(expert_balance_loss(probs, idx, 4).item(), 1.1, rel_tol=1e-6)
    # devices {0,1},{2,3}: f' = [2, 0], P' = [0.55, 0.45] -> 1.1
    assert math.isclose(device_balance_loss(probs, idx, 4, 2).item(), 1.1, rel_tol=1e-6)


def test_weighted_balance_losses_equal_those_of_the_kept_tokens():
    """Weights of 0 (padding, packed filler) drop tokens exactly as indexing them out would."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 8, generator=g).softmax(-1)
    idx = torch.rand(6, 8, generator=g).topk(2, -1).indices
    keep = torch.tensor([1, 0, 1, 1, 0, 1])
    kept = keep.bool()
    torch.testing.assert_close(expert_balance_loss(probs, idx, 8, keep), expert_balance_loss(probs[kept], idx[kept], 8))
    torch.testing.assert_close(device_balance_loss(probs, idx, 8, 4, keep),
                               device_balance_loss(probs[kept], idx[kept], 8, 4))
    assert not torch.allclose(expert_balance_loss(probs, idx, 8), expert_balance_loss(probs[kept], idx[kept], 8))


def test_balance_stats_on_known_counts():
    s = balance_stats(torch.tensor([6, 2, 0, 0]))
    assert math.isclose(s["maxvio"], 6 / 2 - 1)
    assert math.isclose(s["cv"], math.sqrt(6) / 2, rel_tol=1e-6)
    assert s["dead"] == 2


def test_counts_equal_tokens_times_topk_excluding_padding():
    p = load_policy(ModelConfig(), LoraConfig())
    mon = ExpertMonitor(p.model)
    p.model.train()
    ids = torch.randint(10, 90, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    p.model(input_ids=ids, attention_mask=mask)
    real = int(mask.sum())
    for layer, counts in mon.counts.items():
        assert int(counts.sum()) == real * 2, layer
    summary = mon.summary()
    assert {"moe/layer1/cv", "moe/layer2/maxvio", "moe/entropy_mean", "moe/dead_mean"} <= set(summary)
    p.model.eval()
    p.model(input_ids=ids)
    assert all(int(c.sum()) == 0 for c in mon.counts.values()), "eval passes are not counted"


def test_gradient_checkpointing_does_not_double_count():
    p = load_policy(ModelConfig(gradient_checkpointing=True), LoraConfig())
    mon = ExpertMonitor(p.model, alpha1=0.01)
    p.model.train()
    out = p.model(input_ids=torch.randint(10, 90, (2, 5)))
    (out.logits.mean() + mon.pop_aux_loss()).backward()
    assert all(int(c.sum()) == 10 * 2 for c in mon.counts.values())


def test_aux_loss_added_equals_sum_over_layers():
    p = load_policy(ModelConfig(), LoraConfig())
    mon = ExpertMonitor(p.model, alpha1=0.5)
    captured = []
    for _, r in mon.routers:
        r.register_forward_hook(lambda m, i, o: captured.append((o[0].float().softmax(-1), o[2])))
    p.model.train()
    p.model(input_ids=torch.randint(10, 90, (2, 6)))
    expected = sum(0.5 * expert_balance_loss(pr, ix, 8) for pr, ix in captured)
    assert torch.isclose(mon.pop_aux_loss(), expected)


def test_router_replay_forces_recorded_routing():
    p = load_policy(ModelConfig(), LoraConfig())
    replay = RouterReplay(p.model)
    ids = torch.randint(10, 90, (2, 6))
    with replay("record", key=0):
        p.model(input_ids=ids)
    recorded = {k: v.clone() for k, v in replay.store.items()}
    with torch.no_grad():
        for _, r in replay.routers:
            r.weight.add_(torch.randn_like(r.weight))
    seen = []
    hooks = [r.register_forward_hook(lambda m, i, o: seen.append(o[2])) for _, r in replay.routers]
    with replay("replay", key=0):
        p.model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert replay.flip_rate() > 0, "perturbing routers should have flipped some choices"
    layers = [layer for layer, _ in replay.routers]
    assert len(seen) == len(layers)
    for layer, used in zip(layers, seen):
        assert torch.equal(used, recorded[(0, layer)]), f"layer {layer} did not replay the recorded experts"


def test_counts_every_pass_through_the_decoder_directly():
    """GRPO's log-prob path calls the decoder without the LM head; each call is a new pass."""
    p = load_policy(ModelConfig(), LoraConfig())
    mon = ExpertMonitor(p.model)
    p.model.train()
    decoder = p.model.get_base_model().model
    for _ in range(3):
        decoder(input_ids=torch.randint(10, 90, (2, 5)))
    assert all(int(c.sum()) == 3 * 10 * 2 for c in mon.counts.values())
    mon.summary()
    decoder(input_ids=torch.randint(10, 90, (1, 4)))
    assert mon.summary() and len(mon.history) == 2

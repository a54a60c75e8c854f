"""The frozen weights' round trip to host memory, and where the GRPO run does it in the engine's wake-up."""

import os
from types import SimpleNamespace

import pytest
import torch

from align.config import AlignConfig, LoraConfig, ModelConfig
from align.errors import AlignError
from align.grpo.run import GRPORun, _offload
from align.offload import FrozenOffload
from align.policy import load_policy

IDS = torch.tensor([[1, 5, 30, 40, 50, 6, 20, 21]])


def _loss(model) -> torch.Tensor:
    return model(IDS, labels=IDS).loss


def test_round_trip_keeps_parameters_values_and_training():
    """Every frozen weight (and only those) points at its host buffer while out; afterwards the same parameter
    objects hold the same values, and loss and LoRA gradients equal those of a policy that never moved."""
    moved, still = (load_policy(ModelConfig(), LoraConfig()) for _ in range(2))
    with torch.no_grad():
        for p in moved.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        for p, q in zip(still.model.parameters(), moved.model.parameters()):
            p.copy_(q)
    params = list(moved.model.parameters())
    frozen = [p for p in params if not p.requires_grad]
    values = [p.detach().clone() for p in params]
    off = FrozenOffload(moved.model, accelerator_only=False)
    assert len(off.params) == len(frozen) > 0 and off.nbytes == sum(p.numel() * p.element_size() for p in frozen)
    trainable_ptrs = [p.data_ptr() for p in params if p.requires_grad]
    off.offload()
    assert [p.data_ptr() for p in off.params] == [h.data_ptr() for h in off.host]
    assert [p.data_ptr() for p in params if p.requires_grad] == trainable_ptrs
    off.offload()  # already out: nothing happens
    off.restore()
    assert list(moved.model.parameters()) == params and not off.offloaded
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    a, b = _loss(moved.model), _loss(still.model)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.backward()
    b.backward()
    for (n, p), q in zip(moved.model.named_parameters(), still.model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    hosts = [h.data_ptr() for h in off.host]
    off.offload()
    assert [h.data_ptr() for h in off.host] == hosts  # buffers reused
    off.restore()


def test_cpu_parameters_stay_by_default():
    off = FrozenOffload(load_policy(ModelConfig(), LoraConfig()).model)
    assert off.params == [] and off.nbytes == 0
    off.offload()
    assert not off.offloaded


class _Engine:
    """vLLM's lifecycle as the run sees it: asleep; weights wake, ``push`` runs, then the KV cache wakes."""
    shares_weights = False

    def __init__(self, events):
        self.events, self.needs_full_sync, self.last_sync = events, True, {"seconds": 0.5, "params": 7}

    def wake_up(self, push=None):
        self.events.append("wake weights")
        if push is not None:
            push(self.needs_full_sync)
        self.events.append("wake kv cache")

    def sleep(self):
        self.events.append("sleep")


def test_run_offloads_between_the_sync_and_the_kv_cache_and_restores_after_sleep():
    events = []
    off = SimpleNamespace(offload=lambda: events.append("offload"), restore=lambda: events.append("restore"),
                          copied=3)
    run = SimpleNamespace(engine=_Engine(events), engine_stale=True, offload=off,
                          push_weights=lambda full: events.append(f"sync full={full}"))
    m: dict = {}
    GRPORun.ready_engine(run, m)
    GRPORun.release_engine(run, m)
    assert events == ["wake weights", "sync full=True", "offload", "wake kv cache", "sleep", "restore"]
    assert m["time/sync"] == 0.5 and m["sync/params"] == 7 and {"time/offload", "time/restore"} <= set(m)
    assert m["offload/copied_tensors"] == 3
    events.clear()
    run.engine.needs_full_sync = run.engine_stale = False  # nothing changed: no sync, the weights still leave
    GRPORun.ready_engine(run, {})
    assert events == ["wake weights", "offload", "wake kv cache"]


def test_offload_refuses_engines_that_generate_from_the_trainer_weights():
    cfg = AlignConfig()
    cfg.rollout.offload_policy_weights = True
    dist = SimpleNamespace(shards_params=False, backend="ddp")
    shared = type("HFEngine", (), {"shares_weights": True})()
    with pytest.raises(AlignError, match="rollout.offload_policy_weights: the HFEngine generates"):
        _offload(cfg, dist, None, shared)
    with pytest.raises(AlignError, match="fsdp2 shards"):
        _offload(cfg, SimpleNamespace(shards_params=True, backend="fsdp2"), None, _Engine([]))
    cfg.rollout.offload_policy_weights = False
    assert _offload(cfg, dist, None, _Engine([])) is None


def test_only_weights_written_since_the_last_restore_are_copied_out_again():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    off = FrozenOffload(model, accelerator_only=False)
    off.offload()
    assert off.copied == 4
    off.restore()
    off.offload()
    assert off.copied == 0  # frozen: the host copies still hold them
    off.restore()
    with torch.no_grad():
        model[1].weight.add_(1.0)  # e.g. load_state_dict
    want = model[1].weight.detach().clone()
    off.offload()
    assert off.copied == 1 and torch.equal(off.host[2], want)
    off.restore()
    assert torch.equal(model[1].weight, want)


def test_host_buffers_are_views_of_one_allocation():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2).to(torch.bfloat16))
    for p in model.parameters():
        p.requires_grad_(False)
    values = [p.detach().clone() for p in model.parameters()]
    off = FrozenOffload(model, accelerator_only=False)
    off.offload()
    storages = {h.untyped_storage().data_ptr() for h in off.host}
    assert len(storages) == 1 and all(h.data_ptr() % 64 == 0 for h in off.host)
    assert [h.dtype for h in off.host] == [p.dtype for p in model.parameters()]
    off.restore()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux: the mapping's flags in /proc/self/smaps")
def test_host_buffers_are_left_out_of_forked_processes():
    # Linux copies page-locked pages into every forked child: the mapping must say "do not copy" (VmFlags dc).
    model = torch.nn.Linear(1024, 1024).requires_grad_(False)
    off = FrozenOffload(model, accelerator_only=False)
    off.offload()
    addr = off.host[0].data_ptr()
    flags, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    assert flags is not None and "dc" in flags


def test_expandable_segments_switch_on_after_the_engine_started_and_only_when_asked(monkeypatch):
    from align.dist import Dist
    from align.grpo import run as run_mod
    from rewards import Combined

    order = []
    monkeypatch.setattr(run_mod, "make_engine", lambda *a, **k: order.append("engine") or _Engine([]))
    monkeypatch.setattr(run_mod, "use_expandable_segments", lambda on=True: order.append(f"expandable {on}"))
    cfg = AlignConfig()
    policy = load_policy(cfg.model, cfg.lora)
    rows = [{"prompt": [{"role": "user", "content": "1 + 1"}]}]
    run_mod.setup(cfg, Dist(), rows, Combined({"math": 1.0}), policy=policy)
    assert order == ["engine"]
    cfg.train.expandable_segments = True
    run_mod.setup(cfg, Dist(), rows, Combined({"math": 1.0}), policy=policy)
    assert order == ["engine", "engine", "expandable True"]  # vLLM's pool and CUDA graphs are made as it makes them


def test_expandable_segments_is_a_no_op_without_a_gpu(monkeypatch):
    from align.offload import use_expandable_segments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert use_expandable_segments(True) is None
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ

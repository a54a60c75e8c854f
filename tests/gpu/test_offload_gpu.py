"""GPU tier: the policy's frozen weights leave the device and come back (``rollout.offload_policy_weights``)."""

import pytest
import torch

from align.offload import FrozenOffload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_offload_frees_the_frozen_weights_and_restores_them_bit_for_bit():
    model = torch.nn.Sequential(torch.nn.Linear(4096, 8192, bias=False), torch.nn.Linear(8192, 16)).cuda().bfloat16()
    model[0].weight.requires_grad_(False)
    frozen, trainable = model[0].weight, model[1].weight
    before, kept = frozen.detach().clone(), trainable.data_ptr()
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    want = model(x)
    off = FrozenOffload(model)
    assert off.nbytes == 4096 * 8192 * 2
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated()
    off.offload()
    assert used - torch.cuda.memory_allocated() == off.nbytes  # all of it, and nothing else
    assert frozen.device.type == "cpu" and frozen.is_pinned() and trainable.data_ptr() == kept
    off.restore()
    assert frozen.device.type == "cuda" and torch.equal(frozen, before)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    host = off.host[0].data_ptr()
    off.offload()
    assert off.host[0].data_ptr() == host  # the pinned buffers are reused, not pinned again
    assert off.copied == 0  # unchanged since: nothing travels out again
    off.restore()
    assert torch.equal(frozen, before)
    with torch.no_grad():
        frozen.mul_(2)
    off.offload()
    off.restore()
    assert off.copied == 1 and torch.equal(frozen, before * 2)


def test_expandable_segments_switch_applies_to_new_allocations_and_keeps_other_settings(monkeypatch):
    from align.offload import use_expandable_segments

    def segments(t):  # the allocator's segment that holds t
        addr = t.data_ptr()
        return [s for s in torch.cuda.memory_snapshot() if s["address"] <= addr < s["address"] + s["total_size"]]

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.9")
    try:
        assert use_expandable_segments(True) == "garbage_collection_threshold:0.9,expandable_segments:True"
        # The setting is for new segments: ask for more than any segment cached by earlier tests could hold.
        n = torch.cuda.memory_reserved() + 2**26
        grown = torch.empty(n, dtype=torch.uint8, device="cuda")
        assert segments(grown)[0]["is_expandable"]
        assert use_expandable_segments(False).endswith("expandable_segments:False")
        fixed = torch.empty(torch.cuda.memory_reserved() + 2**26, dtype=torch.uint8, device="cuda")
        assert not segments(fixed)[0]["is_expandable"]
    finally:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")

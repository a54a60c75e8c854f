"""What align asks of vLLM: GPU graph defaults that ``rollout.engine_kwargs`` overrides, nothing extra on the CPU."""

import os
import sys
import types

import pytest
import torch

from rollout import vllm_engine


class _FakeLLM:
    seen: dict = {}
    calls: list = []

    def __init__(self, **kwargs):
        _FakeLLM.seen = kwargs

    def apply_model(self, fn):  # the CPU path patches rope inside the engine's model
        return 0

    def sleep(self, level):
        _FakeLLM.calls.append(("sleep", level))

    def wake_up(self, tags):
        _FakeLLM.calls.append(("wake", tuple(tags)))


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_FakeLLM))
    monkeypatch.setattr(vllm_engine, "_quiet_vllm", lambda: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    return _FakeLLM


def _start(monkeypatch, cuda: bool, **kw):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    vllm_engine.VLLMEngine("/m", dtype="bfloat16", **kw)
    return _FakeLLM.seen


def test_gpu_gets_compile_free_full_decode_graphs_and_512_running(fake_vllm, monkeypatch):
    seen = _start(monkeypatch, cuda=True)
    assert seen["enforce_eager"] is False and seen["enable_sleep_mode"] is True
    assert seen["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert seen["max_num_seqs"] == 512


def test_engine_kwargs_override_each_default(fake_vllm, monkeypatch):
    seen = _start(monkeypatch, cuda=True, extra={"max_num_seqs": 1024, "compilation_config": {"mode": 3}})
    assert seen["max_num_seqs"] == 1024 and seen["compilation_config"] == {"mode": 3}


def test_eager_or_cpu_engines_get_no_graph_settings(fake_vllm, monkeypatch):
    seen = _start(monkeypatch, cuda=True, enforce_eager=True)
    assert seen["enforce_eager"] is True and "compilation_config" not in seen and "max_num_seqs" not in seen
    seen = _start(monkeypatch, cuda=False)
    assert seen["enforce_eager"] is True and "compilation_config" not in seen and seen["enable_sleep_mode"] is False


def test_waking_on_a_gpu_returns_the_trainers_cached_memory_first(fake_vllm, monkeypatch):
    """sleep(2) -> empty the trainer's allocator cache -> wake weights -> full sync -> wake KV cache."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = vllm_engine.VLLMEngine("/m", dtype="bfloat16", load_format="dummy")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: _FakeLLM.calls.append(("empty_cache",)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None, raising=False)
    _FakeLLM.calls = []
    engine.sleep()
    engine.wake_up(lambda full: _FakeLLM.calls.append(("push", full)))
    assert _FakeLLM.calls == [("sleep", 2), ("empty_cache",), ("wake", ("weights",)), ("push", True),
                              ("wake", ("kv_cache",))]


def test_kv_cache_gib_sizes_the_cache_on_gpus_only(fake_vllm, monkeypatch):
    assert _start(monkeypatch, cuda=True, kv_cache_gib=12)["kv_cache_memory_bytes"] == 12 * 2**30
    assert "kv_cache_memory_bytes" not in _start(monkeypatch, cuda=True)
    assert "kv_cache_memory_bytes" not in _start(monkeypatch, cuda=False, kv_cache_gib=12)


def test_importing_vllm_keeps_the_trainers_inductor_compile_threads(tmp_path, monkeypatch):
    """vLLM's import sets inductor to one compile thread (``vllm/env_override.py``); the engine puts the trainer's
    setting back. A stand-in ``vllm`` package does what vLLM's import does."""
    import torch._inductor.config as inductor

    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(
        "import os, torch._inductor.config as c\nos.environ['TORCHINDUCTOR_COMPILE_THREADS'] = '1'\n"
        "c.compile_threads = 1\nclass LLM:\n    def __init__(self, **kw): pass\n"
        "    def apply_model(self, fn): return 0\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(vllm_engine, "_quiet_vllm", lambda: None)
    # inductor.patch, not monkeypatch: undoing a monkeypatched config entry deletes it (hidden for later tests)
    with inductor.patch(compile_threads=7):
        _start(monkeypatch, cuda=False)
        assert sys.modules["vllm"].__file__.startswith(str(tmp_path))  # the stand-in ran
        assert inductor.compile_threads == 7 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ


def test_importing_vllm_keeps_the_trainers_cudnn_attention_and_generates_without_it(tmp_path, monkeypatch):
    """vLLM's CUDA platform module switches cuDNN attention off process-wide when imported (on import or when the
    engine starts); the trainer's masked attention over packed rows needs it (3.1x faster on the H200), vLLM's
    generate runs without it. A stand-in ``vllm`` package does what vLLM does."""
    from rollout.base import SamplingSettings

    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(
        "import torch\ntorch.backends.cuda.enable_cudnn_sdp(False)\nseen = []\nclass SamplingParams:\n"
        "    def __init__(self, **kw): pass\nclass LLM:\n"
        "    def __init__(self, **kw): torch.backends.cuda.enable_cudnn_sdp(False)\n"
        "    def apply_model(self, fn): return 0\n"
        "    def generate(self, requests, params, use_tqdm):\n"
        "        return seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or []\n")
    (tmp_path / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids): return prompt_token_ids\n")
    for name in ("vllm", "vllm.inputs"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(vllm_engine, "_quiet_vllm", lambda: None)
    monkeypatch.setattr(vllm_engine, "_TRAINER_CUDNN_SDP", None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        engine = vllm_engine.VLLMEngine("/m", dtype="bfloat16")
        assert sys.modules["vllm"].__file__.startswith(str(tmp_path))  # the stand-in ran
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert engine.generate([], SamplingSettings(stop=["."])) == []
        assert sys.modules["vllm"].seen == [False] and torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_gpu_sync_streams_the_weights_one_at_a_time(fake_vllm, monkeypatch):
    """Merged weights are made one by one (``Policy.merged_weights``): the engine must load each before the next
    is made, or it would hold a second copy of every adapted weight."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = vllm_engine.VLLMEngine("/m", dtype="bfloat16", load_format="dummy")
    events = []

    def rpc(method, kwargs):
        for name, _ in kwargs["weights_iterator"]:
            events.append(("load", name))

    engine.llm.collective_rpc, engine.llm.reset_prefix_cache = rpc, lambda: events.append(("reset",))

    def made():
        for i in range(3):
            events.append(("make", f"w{i}"))
            yield f"w{i}", torch.zeros(2, 3)

    engine.update_weights(made())
    assert events == [("make", "w0"), ("load", "w0"), ("make", "w1"), ("load", "w1"), ("make", "w2"),
                      ("load", "w2"), ("reset",)]
    assert engine.last_sync["tensors"] == 3 and engine.last_sync["params"] == 18
    events.clear()
    engine.update_weights(iter(()))
    assert events == [] and engine.last_sync["tensors"] == 0

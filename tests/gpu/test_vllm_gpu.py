"""GPU tier (``pytest -m gpu``): CUDA vLLM colocated with the trainer, on a tiny shape vLLM's CUDA MLA kernels take.

Skipped without CUDA or vLLM (CPU CI). On the device: ``../shared/tools/gpu-vllm-bundle`` carries vLLM, then
``PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 python -m pytest -m gpu tests/gpu``.
"""

import json

import pytest
import torch

from align.config import LoraConfig, ModelConfig, RolloutConfig, TinyModelConfig
from align.grpo.batch import build_batch
from align.grpo.logprobs import completion_logprobs
from align.policy import load_policy
from align.rundir import read_metrics
from conftest import ROOT, run_cli
from rollout import EngineError, SamplingSettings, make_engine, render_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
vllm = pytest.importorskip("vllm")
GPU_TINY = TinyModelConfig(qk_nope_head_dim=128, v_head_dim=128, hidden_size=256)
BF16_MISMATCH = 0.02  # mean |logp_trainer - logp_engine| per token; bf16 kernels differ at ~1e-3


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    p = load_policy(ModelConfig(tiny=GPU_TINY, dtype="bfloat16"), LoraConfig(r=8, alpha=16))
    p.model.cuda()
    return p


def _mismatch(policy, engine, prompts, seed: int) -> tuple[float, list, torch.Tensor]:
    out = engine.generate(prompts, SamplingSettings(n=4, temperature=1.0, max_new_tokens=24, seed=seed))
    comps = [c for ro in out for c in ro.completions]
    pids = [ro.prompt_ids for ro in out for _ in ro.completions]
    b = build_batch(pids, comps, torch.zeros(len(comps)), policy.tokenizer.pad_token_id,
                    mask_truncated=False).to("cuda")
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model.eval(), b.input_ids, b.attention_mask, b.position_ids, b.prompt_width)
    m = b.completion_mask.bool()
    return float((lp.float() - b.rollout_logp)[m].abs().mean()), b, m


def test_sleep_level2_wake_sync_wake_keeps_engine_equal_to_trainer(policy):
    """align's GPU engine defaults (``rollout.vllm_engine.GPU_GRAPHS``). One sleep-mode engine per process: vLLM's
    CuMem allocator refuses a second ("can only be used for one instance per process"); other engine settings are
    tried through the CLI test's subprocess."""
    rc = RolloutConfig(gpu_memory_utilization=0.2, sleep_level=2)
    engine = make_engine("vllm", policy, rc, "bfloat16", 256)
    prompts = render_prompts(policy.tokenizer, [[{"role": "user", "content": f"What is {a}+{b}?"}]
                                                for a, b in [(3, 4), (12, 7), (25, 5), (9, 18)]])
    first, b, m = _mismatch(policy, engine, prompts, seed=0)
    assert first < BF16_MISMATCH, f"dummy start + full sync: mismatch {first:.4f}"
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        moved, _ = completion_logprobs(policy.model, b.input_ids, b.attention_mask, b.position_ids, b.prompt_width)
    assert float((moved.float() - b.rollout_logp)[m].abs().mean()) > 5 * BF16_MISMATCH, "perturbation too small"
    engine.sleep()
    assert engine.asleep and engine.needs_full_sync
    pushed = []

    def push(full):
        pushed.append(full)
        with policy.merged_weights(only_adapted=not full) as w:
            engine.update_weights(w)

    engine.wake_up(push)
    assert pushed == [True] and not engine.asleep
    after, _, _ = _mismatch(policy, engine, prompts, seed=1)
    assert after < BF16_MISMATCH, f"after sleep(2) / wake / full sync: mismatch {after:.4f}"
    print(f"mismatch: start {first:.2e}, after level-2 cycle {after:.2e}, sync {engine.last_sync}, "
          f"startup {engine.startup}")


def test_auto_engine_says_why_not_vllm_for_the_cpu_tiny_shape():
    cpu_shape = load_policy(ModelConfig(dtype="bfloat16"), LoraConfig(r=4, alpha=8))
    with pytest.raises(EngineError, match="head shape"):
        make_engine("vllm", cpu_shape, RolloutConfig(), "bfloat16", 128)
    fp32 = load_policy(ModelConfig(tiny=GPU_TINY), LoraConfig(r=4, alpha=8))
    with pytest.raises(EngineError, match="float32"):
        make_engine("vllm", fp32, RolloutConfig(), "float32", 128)
    fp32.model.cuda()
    assert make_engine("auto", fp32, RolloutConfig(), "float32", 128).name == "fast"


def test_grpo_cli_with_cuda_vllm_keeps_mismatch_small_after_syncs(tmp_path):
    out = tmp_path / "run"
    res = run_cli("grpo", ROOT / "recipes" / "tiny_gpu_rl.yaml", f"output.dir={out}", "grpo.steps=4",
                  "eval.num_samples=8", "train.save_steps=0")
    assert res.returncode == 0, res.stderr[-4000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["mismatch/abs_logp_mean"] < BF16_MISMATCH, (r["step"], r["mismatch/abs_logp_mean"])
    assert all(r["time/sync"] > 0 and r["sync/params"] > 0 for r in rows[1:]), "every later step syncs"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["startup"]["first_sync_s"] > 0
    print(json.dumps({"steps": [{k: v for k, v in r.items() if k.startswith(("time/", "mismatch/", "sync/"))}
                                for r in rows], "startup": summary["startup"]}, indent=1))

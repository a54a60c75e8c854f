"""Multi-process training: rank shares add up to the single-process numbers, and a 2-process run
(torchrun, gloo, DDP through accelerate) follows the 1-process loss curve with the same global batch."""

import json
import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from align.dist import Dist
from align.losses import LOSSES, aggregate
from align.rundir import read_metrics
from conftest import ROOT

pytestmark = pytest.mark.integration  # real SFT/GRPO/vLLM runs: make test-integration


def _dist(rank: int, world: int) -> Dist:
    return Dist(SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0, device="cpu"))


def test_prompt_shards_cover_the_step_and_align_with_minibatches():
    b, g, mb, world = 8, 4, 16, 2
    shards = [_dist(r, world).prompt_indices(b, g, mb) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(b))
    # 16-sequence minibatches hold 4 prompts; each rank's k-th local minibatch (2 prompts) lies
    # inside the single-process k-th minibatch.
    per_local = mb // g // world
    for s in shards:
        for k in range(len(s) // per_local):
            assert {i // (mb // g) for i in s[k * per_local:(k + 1) * per_local]} == {k}
    assert _dist(1, 2).prompt_indices(6, 4, 64) == [3, 4, 5]
    with pytest.raises(Exception, match="divisible"):
        _dist(0, 3).prompt_indices(8, 4, 16)


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_rank_shares_of_aggregate_add_up_to_the_whole(mode):
    torch.manual_seed(0)
    per_token = torch.randn(6, 5, requires_grad=True)
    mask = (torch.rand(6, 5) > 0.3).float()
    whole = aggregate(per_token, mask, mode, max_len=7)
    norm = {"num_seqs": 6, "num_tokens": float(mask.sum())}
    parts = [aggregate(per_token[s], mask[s], mode, max_len=7, **norm) for s in (slice(0, 2), slice(2, 6))]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)
    g_whole = torch.autograd.grad(whole, per_token)[0]
    g_parts = torch.autograd.grad(sum(parts), per_token)[0]
    assert torch.allclose(g_whole, g_parts, atol=1e-7)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_splits_over_ranks(loss):
    torch.manual_seed(1)
    logp = (torch.randn(4, 6) * 0.1 - 1).requires_grad_()
    old = logp.detach() + torch.randn(4, 6) * 0.05
    ref = logp.detach() + torch.randn(4, 6) * 0.05
    adv = torch.randn(4)
    mask = (torch.rand(4, 6) > 0.2).float()
    kw = {"ref_logp": ref, "beta": 0.1, "max_len": 6}
    whole, _ = LOSSES[loss](logp, old, adv, mask, **kw)
    norm = {"num_seqs": 4, "num_tokens": float(mask.sum())}
    parts = [LOSSES[loss](logp[s], old[s], adv[s], mask[s], norm=norm, **{**kw, "ref_logp": ref[s]})[0]
             for s in (slice(0, 1), slice(1, 4))]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-5)


def test_hf_samples_do_not_depend_on_the_batch():
    from align.config import load_config
    from align.policy import load_policy
    from rollout import SamplingSettings
    from rollout.hf import HFEngine

    cfg = load_config(None, ["lora.enabled=false"])
    policy = load_policy(cfg.model, cfg.lora)
    engine = HFEngine(policy.model, policy.tokenizer)
    a, b = policy.tokenizer.encode("1+2="), policy.tokenizer.encode("13+14=")
    s = SamplingSettings(n=3, temperature=1.0, max_new_tokens=6, seeds=[5, 9])
    both = engine.generate([a, b], s)
    alone = engine.generate([b], SamplingSettings(n=3, temperature=1.0, max_new_tokens=6, seeds=[9]))
    assert [c.token_ids for c in both[1].completions] == [c.token_ids for c in alone[0].completions]
    other = engine.generate([b], SamplingSettings(n=3, temperature=1.0, max_new_tokens=6, seeds=[10]))
    assert [c.token_ids for c in other[0].completions] != [c.token_ids for c in alone[0].completions]


class _EchoEngine:
    name = "echo"

    def generate(self, prompts, settings):
        from rollout.base import Completion, Rollout

        return [Rollout(list(p), [Completion([s], "", [0.0], "stop")]) for p, s in zip(prompts, settings.seeds)]


def _tp_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as td

    from rollout import SamplingSettings
    from rollout.tp_group import TPGroupEngine

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    engine = TPGroupEngine(_EchoEngine(), td.new_group([0, 1]), rank)
    prompts = [[rank, i] for i in range(rank + 1)]
    got = engine.generate(prompts, SamplingSettings(seeds=[100 * rank + i for i in range(rank + 1)]))
    out.put((rank, [r.prompt_ids for r in got], [r.completions[0].token_ids for r in got]))
    td.destroy_process_group()


def test_tensor_parallel_group_engine_returns_each_rank_its_own_rollouts():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (p, s)) for r, p, s in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
    assert got[0] == ([[0, 0]], [[0]])
    assert got[1] == ([[1, 0], [1, 1]], [[100], [101]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, stage: str, recipe: str, out, *overrides):
    import subprocess

    launcher = [sys.executable, "-m", "align.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
         "-m", "align.cli"]
    res = subprocess.run([*launcher, stage, str(ROOT / "recipes" / recipe), f"output.dir={out}", *overrides],
                         capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return read_metrics(out)


GRPO = ["grpo.steps=3", "eval.num_samples=8", "grpo.prompts_per_step=8", "rollout.num_generations=4",
        "grpo.minibatch_size=16", "grpo.mu=2", "train.save_steps=0", "output.tensorboard=false"]
EXACT = ("actor/pg_loss", "actor/grad_norm", "reward/mean", "completion/tokens", "completion/len_mean")


def _same_curves(one, two, keys, rel):
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-8), (a["step"], key)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_process_grpo_follows_the_one_process_run(sft_checkpoint, tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    args = [f"model.name_or_path={sft_checkpoint / 'final'}", f"rollout.engine={engine}", *GRPO]
    one = _run(1, "grpo", "tiny_math_rl.yaml", tmp_path / "one", *args)
    # With the HF engine the two ranks also accumulate over micro-batches (8 local rows -> 3 parts, DDP
    # syncing on the last): still the one-process minibatch step.
    micro = ["grpo.micro_batch_size=3"] if engine == "hf" else []
    two = _run(2, "grpo", "tiny_math_rl.yaml", tmp_path / "two", *args, *micro)
    assert any(r["reward/std"] > 0 for r in one), "the check needs non-zero advantages"
    _same_curves(one, two, EXACT, rel=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == engine
    w1 = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-4), k


def test_two_process_sft_follows_the_one_process_run(tmp_path):
    args = ["train.max_steps=20", "train.logging_steps=2", "eval.num_samples=8", "output.tensorboard=false",
            "data.synthetic.num_train=400"]
    one = [r for r in _run(1, "sft", "tiny_sft.yaml", tmp_path / "one", *args) if "loss" in r]
    two = [r for r in _run(2, "sft", "tiny_sft.yaml", tmp_path / "two", *args) if "loss" in r]
    assert len(one) == 10 and one[-1]["loss"] < one[0]["loss"] - 1.0
    # Same global batch of 8: ranks take 4 rows each of the same sampler order; per-token loss
    # normalization is global (average_tokens_across_devices), so only summation order differs.
    _same_curves(one, two, ["loss"], rel=2e-3)
    _same_curves(one[:3], two[:3], ["loss", "grad_norm"], rel=1e-4)


def test_metrics_reduce_as_means_sums_and_maxima():
    class TwoRanks(Dist):
        def all_gather_objects(self, obj):
            return [obj, {"reward/mean": 0.25, "completion/tokens": 30, "actor/pg_loss": -0.5,
                          "mismatch/abs_logp_max": 9.0, "time/update": 1.0, "only/rank1": 3.0}]

    d = TwoRanks(SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, device="cpu"))
    got = d.reduce_metrics({"reward/mean": 0.75, "completion/tokens": 10, "actor/pg_loss": 0.25,
                            "mismatch/abs_logp_max": 1.0, "time/update": 2.5, "note": "text"})
    assert got == {"reward/mean": 0.5, "completion/tokens": 40, "actor/pg_loss": -0.25,
                   "mismatch/abs_logp_max": 9.0, "time/update": 2.5, "only/rank1": 3.0}

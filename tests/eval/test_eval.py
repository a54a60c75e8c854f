import itertools
import json

import pytest

from align.heldout import evaluate
from align.heldout import pass_at_k
from eval.run import format_table
from rewards import Combined
from eval.tasks import TASKS, load_task
from rollout.base import Completion, Rollout, SamplingSettings


def _brute(n, c, k):
    items = [1] * c + [0] * (n - c)
    combos = list(itertools.combinations(range(n), k))
    return sum(any(items[i] for i in combo) for combo in combos) / len(combos)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_equals_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k))


class OracleEngine:
    """Returns a fixed completion per prompt: the known solution, or a broken one."""

    name = "oracle"

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, settings):
        return [Rollout(p, [Completion([1], a, [0.0], "stop") for _ in range(settings.n)])
                for p, a in zip(prompts, self.answers)]


class Tok:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [len(messages)]


@pytest.mark.parametrize("name", list(TASKS))
def test_shipped_samples_score_exactly(name):
    task, rows = load_task(f"{name}:sample")
    assert rows, name
    cols = Combined(task.rewards).columns
    good = evaluate(OracleEngine([r[task.reference] for r in rows]), Tok(), rows, task.rewards,
                    SamplingSettings(n=1, temperature=0.0), columns=cols)
    assert good.summary["accuracy"] == 1.0 and good.summary["unscorable"] == 0, good.samples[:2]
    bad = evaluate(OracleEngine(["#### -12345" if "math" in task.rewards else "    return None\n"] * len(rows)), Tok(),
                   rows, task.rewards, SamplingSettings(n=1, temperature=0.0), columns=cols)
    assert bad.summary["accuracy"] == 0.0


def test_summary_pass_at_k_and_samples():
    task, rows = load_task("synthetic", limit=10)
    answers = [r["messages"][1]["content"] if i % 2 == 0 else "#### -1" for i, r in enumerate(rows)]
    res = evaluate(OracleEngine(answers), Tok(), rows, task.rewards, SamplingSettings(n=3, temperature=1.0), ks=[1, 3])
    assert res.summary["accuracy"] == pytest.approx(0.5) and res.summary["pass@3"] == pytest.approx(0.5)
    assert len(res.samples) == 30 and {"prompt", "completion", "score", "reason"} <= set(res.samples[0])


def test_table_has_one_row_per_checkpoint():
    text = format_table({"sft": {"synthetic": {"accuracy": 0.5, "accuracy_stderr": 0.1}},
                         "rl": {"synthetic": {"accuracy": 0.75, "accuracy_stderr": 0.1}}}, [1])
    assert "| sft | 50.0 ± 10.0 |" in text and "| rl | 75.0 ± 10.0 |" in text
    sampled = format_table({"sft": {"synthetic": {"accuracy": 0.5, "accuracy_stderr": 0.1}}}, [1],
                           SamplingSettings(n=4, temperature=1.0))
    assert sampled.startswith("sampled at T=1, n=4 per prompt")
    assert format_table({}, [1], SamplingSettings(temperature=0.0)).startswith("greedy decoding")


def test_prompts_longer_than_the_context_are_skipped_and_counted():
    task, rows = load_task("synthetic", limit=4)
    engine = OracleEngine([r["messages"][1]["content"] for r in rows])
    engine.max_len = 10
    tok = type("T", (), {"apply_chat_template": lambda self, m, **k: [0] * (5 if "1" in m[0]["content"] else 50)})()
    res = evaluate(engine, tok, rows, task.rewards, SamplingSettings(n=1, temperature=0.0, max_new_tokens=4))
    assert res.summary["skipped_too_long"] + res.summary["num_prompts"] == 4


def test_report_writes_pngs_and_embeds_eval_table(tmp_path):
    from eval.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward/mean": 0.1 * s, "actor/clipfrac": 0.01, "moe/layer1/cv": 0.5, "moe/layer1/maxvio": 1.0,
             "moe/cv_mean": 0.5, "time/rollout": 1.0} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "moe_history.json").write_text(json.dumps([{"1": [5, 3, 0, 2]}, {"1": [3, 3, 2, 2]}]))
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "table.md").write_text("| checkpoint | synthetic |\n|---|---|\n| rl | 50.0 ± 1.0 |\n")
    report = write_report([str(run)], str(tmp_path / "rep"), str(ev))
    text = open(report).read()
    assert "| rl | 50.0 ± 1.0 |" in text
    for png in ("reward.png", "clipfrac.png", "run_experts_start.png", "run_experts_end.png", "run_layer_cv.png"):
        assert (tmp_path / "rep" / "plots" / png).stat().st_size > 1000, png

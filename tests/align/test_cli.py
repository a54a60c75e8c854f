"""Bad inputs: one clear line naming the file/key/line, exit code 2, nothing written."""

import json

import pytest

from align.cli import main


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("align: error:"), err
    return err[0]


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0 and "recipe" in capsys.readouterr().out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "recipes/tiny_sft.yaml", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["sft", "train.nope=1"], "train.nope: unknown key"),
    (["sft", "train.batch_size=big"], "train.batch_size: expected int"),
    (["sft", "recipes/does_not_exist.yaml"], "recipe file not found"),
    (["sft", "model.name_or_path=./no/such/model"], "no such local path"),
])
def test_config_and_model_errors(capsys, tmp_path, argv, needle):
    assert needle in _err(capsys, argv + [f"output.dir={tmp_path / 'out'}"])


def test_data_errors(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert "dataset file not found" in _err(capsys, ["sft", f"data.train={missing}", f"output.dir={tmp_path / 'a'}"])
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad.write_text(json.dumps(good) + "\n{oops\n")
    assert f"{bad}:2: malformed JSON" in _err(capsys, ["sft", f"data.train={bad}", f"output.dir={tmp_path / 'b'}"])
    nomsg = tmp_path / "nomsg.jsonl"
    nomsg.write_text('{"text": "hello"}\n')
    assert "row 1 has no 'messages'" in _err(capsys, ["sft", f"data.train={nomsg}", f"output.dir={tmp_path / 'c'}"])


def test_unwritable_and_occupied_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in _err(capsys, ["sft", f"output.dir={blocker / 'sub'}"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("keep me\n")
    assert "is not empty" in _err(capsys, ["sft", f"output.dir={run}"])
    assert (run / "metrics.jsonl").read_text() == "keep me\n"


@pytest.mark.parametrize("override, needle", [
    ("rollout.num_generations=1", "nothing trains"),
    ("train.max_steps=5", "GRPO runs grpo.steps"),
    ("grpo.loss=ppo", "grpo.loss: unknown loss 'ppo'"),
    ("grpo.advantage=gae", "grpo.advantage: unknown advantage 'gae'"),
    ("train.lr_scheduler=nope", "train.lr_scheduler: unknown scheduler 'nope'"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1"),
    ("grpo.minibatch_size=0", "grpo.minibatch_size: must be >= 1"),
    ("rewards.functions={nope: 1.0}", "unknown reward 'nope'"),
])
def test_grpo_settings_that_cannot_train_fail_before_anything_starts(capsys, tmp_path, override, needle):
    out = tmp_path / "out"
    assert needle in _err(capsys, ["grpo", "recipes/tiny_math_rl.yaml", override, f"output.dir={out}"])
    assert not out.exists(), "nothing written"


def test_overwrite_keeps_the_old_run_until_the_new_one_can_replace_it(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "summary.json").write_text('{"old": true}')
    bad = tmp_path / "missing.jsonl"
    assert "dataset file not found" in _err(capsys, ["sft", f"data.train={bad}", f"output.dir={run}",
                                                      "output.overwrite=true"])
    assert (run / "final" / "adapter_config.json").exists() and (run / "summary.json").read_text() == '{"old": true}'
    assert not (run / ".previous").exists()


def test_a_failed_start_does_not_block_the_corrected_rerun(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("left by a failed start\n")
    bad = tmp_path / "missing.jsonl"
    # Refused for the bad data path, not for the leftover config.yaml.
    assert "dataset file not found" in _err(capsys, ["sft", f"data.train={bad}", f"output.dir={run}"])


def test_merge_refuses_a_non_empty_directory(capsys, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _err(capsys, ["merge", str(tmp_path), str(out)])
    assert (out / "keep.txt").read_text() == "mine"


def test_model_dir_without_config_and_prompts_longer_than_max_length(capsys, tmp_path):
    from align.tokenizer import build_tokenizer

    tok_only = tmp_path / "tok"
    build_tokenizer().save_pretrained(tok_only)
    assert "no config.json there" in _err(capsys, ["sft", f"model.name_or_path={tok_only}",
                                                   f"output.dir={tmp_path / 'a'}"])
    assert "every training prompt is at least that long" in _err(
        capsys, ["sft", "data.max_length=8", "eval.num_samples=2", f"output.dir={tmp_path / 'b'}"])


def test_a_config_error_answers_before_torch_is_imported():
    import subprocess
    import sys

    code = "import sys; from align.cli import main; main(['sft', 'train.nope=1']) ; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False" and "train.nope: unknown key" in res.stderr


def test_trackers_are_checked_up_front_and_get_every_row(capsys, tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    err = _err(capsys, ["sft", "train.report_to=[neptune]", f"output.dir={tmp_path / 'a'}"])
    assert "unknown tracker 'neptune'" in err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed, whatever this machine has
    err = _err(capsys, ["sft", "train.report_to=[mlflow]", f"output.dir={tmp_path / 'b'}"])
    assert "mlflow is not installed" in err
    logged, finished = [], []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: types.SimpleNamespace(log=lambda m, step: logged.append((step, m)),
                                                   finish=lambda: finished.append(kw["config"]["train"]["max_steps"]))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(["sft", "recipes/tiny_sft.yaml", "train.report_to=[wandb]", "train.max_steps=4",
                 "train.logging_steps=2", "eval.num_samples=2", f"output.dir={tmp_path / 'c'}"]) == 0
    assert [s for s, m in logged if "loss" in m] == [2, 4] and finished == [4]

import pytest

from rewards import get_reward
from rewards.code import SETTINGS

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n"


def _he(completions):
    n = len(completions)
    return get_reward("code")(completions, prompt=[PROMPT] * n, test=[TEST] * n, entry_point=["add"] * n)


def test_humaneval_continuation_and_whole_solution():
    continuation, fenced = "    return a + b\n", "```python\ndef add(a, b):\n    return a + b\n```"
    assert _he([continuation, fenced, "def add(a, b):\n    return b + a\n"]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("completion", [
    "    return a - b\n",
    "    return 0\nimport sys\nsys.exit(0)\n",
    "    return 0\nimport os\nos._exit(0)\n",
    "    return 0\nimport builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n",
    "    return 0\nprint('ALIGN-RESULT-00000000000000000000000000000000 1 1')\n",
    "    return 0\nimport sys\nsys.stdout.write('\\nALIGN-RESULT-' + '0'*32 + ' 1 1\\n')\n",
])
def test_failing_or_cheating_solutions_score_zero(completion):
    assert _he([completion]) == [0.0]


def test_mbpp_pass_fraction_and_all_or_nothing(monkeypatch):
    tests = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(0) == 0"]
    reward = get_reward("code")
    assert reward(["def sq(x):\n    return x * 2\n"], tests=[tests]) == [pytest.approx(2 / 3)]
    monkeypatch.setitem(SETTINGS, "all_or_nothing", True)
    assert reward(["def sq(x):\n    return x * 2\n", "def sq(x):\n    return x * x\n"], tests=[tests] * 2) == [0.0, 1.0]


def test_stdin_stdout_cases():
    cases = [{"input": "4", "output": "8"}, {"input": "5", "output": "10\n"}]
    assert get_reward("code")(["print(int(input()) * 2)", "print(8)"], cases=[cases] * 2) == [1.0, 0.5]


def test_row_without_tests_is_unscorable():
    assert get_reward("code")(["print(1)"], tests=[None]) == [None]

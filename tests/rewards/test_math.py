import time

import pytest

from rewards import Combined, get_reward
from rewards.math import extract_answer, gold_answer

GSM8K_GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"


@pytest.mark.parametrize("completion, gold, expected", [
    ("She sold 72 in total.\n#### 72", GSM8K_GOLD, 1.0),
    ("So the answer is $72$.", GSM8K_GOLD, 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### 73", GSM8K_GOLD, 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\boxed{\\frac{\\sqrt2}{2}}", 1.0),
    ("first \\boxed{3} then \\boxed{\\frac{14}{3}}", "\\frac{14}{3}", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{18 \\text{ dollars}}", "18", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{2}", "\\frac{1}{2}", 0.0),
    ("I don't know", "5", 0.0),
])
def test_math_verifier(completion, gold, expected):
    assert get_reward("math")([completion], answer=[gold]) == [expected]


def test_unparseable_gold_is_none_not_one():
    total, per, reasons = Combined({"math": 1.0}).score(["#### 3"], answer=[None])
    assert total == [None] and per["math"] == [None]


def test_extraction_helpers():
    assert extract_answer("a \\boxed{\\frac{a}{\\sqrt{b}}} b") == "\\frac{a}{\\sqrt{b}}"
    assert gold_answer(GSM8K_GOLD) == "72"


@pytest.mark.parametrize("completion", ["#### 9**9**9**9", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
                                        "x" * 1_000_000 + "\\boxed{1}", "#### " + "9" * 100000])
def test_adversarial_inputs_return_in_time(completion):
    t = time.monotonic()
    out = get_reward("math")([completion], answer=["1"])
    assert time.monotonic() - t < 12 and out[0] in (0.0, 1.0)


def test_batch_scoring_is_parallel_and_ordered():
    golds = [str(i) for i in range(50)]
    comps = [f"#### {i if i % 2 else i + 1}" for i in range(50)]
    assert get_reward("math")(comps, answer=golds) == [float(i % 2 == 1) for i in range(50)]


def test_format_and_combined_weights():
    total, per, _ = Combined({"math": 1.0, "format": 0.5}).score(["3+4=7\n#### 7", "7"], answer=["7", "7"])
    assert per["format"] == [1.0, 0.0] and total == [1.5, 0.0]


@pytest.mark.parametrize("completion, expected", [
    ("#### 72\nActually the answer is 73", "73"),
    ("The answer is 73.\nOn reflection:\n#### 72", "72"),
    ("\\boxed{72} ... wait, #### 73", "73"),
    ("#### 73\nso \\boxed{72}", "72"),
])
def test_two_stated_answers_the_last_one_counts(completion, expected):
    assert extract_answer(completion) == expected
    assert get_reward("math")([completion], answer=[GSM8K_GOLD]) == [float(expected == "72")]


def test_format_reward_is_linear_and_matches_its_pattern():
    import re

    from rewards.format import DEFAULT_PATTERN, format_one

    cases = ["3+4=7\n#### 7", "#### 7", "x #### 7 apples", "so \\boxed{7}", "\\boxed{7}", "so \\boxed{}", "a\n####\n9",
             "so \\boxed{7} done", "x \\boxed{\\frac{1}{2}}  ", "just text", "a #### 5####6", "a \\boxed{x}}"]
    for c in cases:
        want = re.fullmatch(DEFAULT_PATTERN, c.strip()) is not None
        assert format_one(c)[0] == float(want), c
    assert format_one("so \\boxed{" + "1 " * 7000)[0] == 0.0  # unclosed: the regex is quadratic here


def test_trl_conversational_completions_are_scored_not_zeroed():
    """TRL hands conversational completions over as message lists; they used to score 0.0 silently."""
    math = get_reward("math")
    chat = [[{"role": "assistant", "content": "3+4=7\n#### 7"}], [{"role": "assistant", "content": "#### 8"}]]
    assert math(chat, answer=["7", "7"]) == [1.0, 0.0]
    with pytest.raises(TypeError, match="list of chat messages"):
        math([{"text": "#### 7"}], answer=["7"])


def test_a_users_reward_by_dotted_path(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    total, per, _ = Combined({"math": 1.0, "my_rewards.shorter": 0.5}).score(["#### 7", "#### 70"], answer=["7", "7"])
    assert per["my_rewards.shorter"] == [pytest.approx(1 / 7), pytest.approx(1 / 8)]
    assert total == [pytest.approx(1 + 0.5 / 7), pytest.approx(0.5 / 8)]
    assert Combined({"my_rewards.shorter": 1.0}).columns == ("answer",)
    with pytest.raises(KeyError, match="cannot import"):
        get_reward("no_such_pkg.fn")
    assert "my_rewards" in sys.modules

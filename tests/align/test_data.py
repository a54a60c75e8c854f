import pytest

from align.config import DataConfig, SyntheticConfig
from align.data import arithmetic_row, check_chat_rows, load_rows, prompt_rows, synthetic_splits
from align.errors import DataError


def test_arithmetic_row_is_correct():
    row = arithmetic_row([12, 7, 5], ["+", "-"])
    assert row["answer"] == "14"
    assert row["messages"][1]["content"] == "12+7=19\n19-5=14\n#### 14"


def test_synthetic_is_deterministic_and_held_out_disjoint():
    cfg = SyntheticConfig(num_train=500, num_eval=50)
    train, held = synthetic_splits(cfg)
    assert synthetic_splits(cfg) == (train, held)
    assert len(held) == 50 and not {r["question"] for r in held} & {r["question"] for r in train}


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"messages": []}\n\n{"messages": [}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        load_rows(str(f))


def test_missing_file_and_rows_without_messages(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_rows(str(tmp_path / "none.jsonl"))
    with pytest.raises(DataError, match="row 2 has no 'messages'"):
        check_chat_rows([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                         {"text": "x"}], "d.jsonl")
    with pytest.raises(DataError, match="role"):
        check_chat_rows([{"messages": [{"role": "robot", "content": "a"}]}], "d.jsonl")


def test_prompt_rows_from_plain_questions(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    rows = prompt_rows(DataConfig(train=str(f), system_prompt="be brief"))
    assert rows[0]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    f.write_text('{"question": "1+1?"}\n')
    with pytest.raises(DataError, match="no gold column 'answer'"):
        prompt_rows(DataConfig(train=str(f)))

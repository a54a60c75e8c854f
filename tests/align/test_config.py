import pytest

from align.config import AlignConfig, describe, load_config
from align.errors import ConfigError
from conftest import ROOT


def test_recipes_load():
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        cfg = load_config(recipe)
        assert isinstance(cfg, AlignConfig)
        assert recipe.read_text().startswith("#"), f"{recipe} needs a header with the exact command"


def test_overrides_fill_types():
    cfg = load_config(None, ["train.learning_rate=3e-3", "lora.r=8", "rollout.stop=[x, y]", "lora.enabled=false"])
    assert cfg.train.learning_rate == pytest.approx(3e-3) and isinstance(cfg.train.learning_rate, float)
    assert cfg.lora.r == 8 and cfg.rollout.stop == ["x", "y"] and cfg.lora.enabled is False


@pytest.mark.parametrize("override, needle", [
    ("train.nope=1", "train.nope: unknown key"),
    ("train.batch_size=abc", "train.batch_size: expected int"),
    ("lora.enabled=3", "lora.enabled: expected bool"),
    ("model.dtype=int8", "model.dtype"),
    ("noequals", "expected key.sub=value"),
    ("lora.dropout=0.1", "lora.dropout: must be 0 with lora.routed_experts=true"),
    ("model.recompute_layers=-2", "model.recompute_layers"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_recipe_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  batch_size: 4\n  typo_key: 1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.typo_key: unknown key"):
        load_config(bad)
    bad.write_text("train:\n  batch_size: [\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    lines = describe()
    assert all(line.rstrip()[-1] != ":" for line in lines), "a field without help text"
    assert any("lora.routed_experts" in line for line in lines)

"""The packages import one way: config -> policy -> rollout, rewards -> sft, grpo -> eval -> cli."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "rollout", "rewards", "eval")
# What each layer may import from the other top-level packages (align.cli is the last layer: it may import all).
ALLOWED = {"rollout": set(), "rewards": set(), "align": {"rollout", "rewards"}, "eval": {"align", "rollout", "rewards"}}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out & set(PACKAGES)


def test_imports_go_one_way():
    wrong = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "align" / "cli.py":
                continue
            bad = _imports(path) - ALLOWED[package] - {package}
            if bad:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert wrong == []

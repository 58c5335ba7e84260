"""Dependencies flow one way: common <- sync, envs, reward, policies <- rollout <- rl. Generation
(rollout/) never imports training (rl/); the bottom packages import none of the ones above them.
Checked on the source (every import statement, also those inside functions), without importing."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the packages of ours it may import
ALLOWED = {
    "common": set(),
    "sync": {"common"},
    "policies": {"common"},
    "reward": {"common"},
    "envs": {"common", "reward"},
    "rollout": {"common", "sync", "envs", "reward", "policies"},
    "rl": {"common", "sync", "envs", "reward", "policies", "rollout", "conf"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(a.name.split(".")[0], node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], node.lineno))
    return out


def violations(package: str) -> list[str]:
    ours = set(ALLOWED)
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for top, line in sorted(imported_packages(path), key=lambda x: x[1]):
            if top in ours and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    assert violations(package) == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A rollout module importing rl inside a function is caught (the check cannot pass vacuously)."""
    bad = tmp_path / "rollout" / "x.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from rl.learner import Learner\n    import rl.config\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("rollout") == ["rollout/x.py:2 imports rl", "rollout/x.py:3 imports rl"]

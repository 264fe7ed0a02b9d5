"""docs/design.md's walk through one training step names the code as it is: every file it names exists, and
every module of plsc/engine and plsc/loss is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- step-walk:begin -->", "<!-- step-walk:end -->"


def step_walk() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "design.md: one step-walk block"
    return text[text.index(BEGIN) : text.index(END)]


def named_files(text: str) -> set[str]:
    return set(re.findall(r"`((?:plsc|devtools|tests)/[\w/]+\.py)`", text))


def test_every_file_the_step_walk_names_exists():
    named = named_files(step_walk())
    assert len(named) > 10
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"docs/design.md names files that do not exist: {missing}"


def test_every_engine_and_loss_module_is_in_the_step_walk():
    named = named_files(step_walk())
    modules = {path.relative_to(ROOT).as_posix() for package in ("engine", "loss")
               for path in (ROOT / "plsc" / package).glob("*.py") if path.name != "__init__.py"}
    assert modules, "no modules found"
    unnamed = sorted(modules - named)
    assert not unnamed, f"docs/design.md's step walk does not name: {unnamed}"


def test_the_check_sees_a_missing_file():
    assert named_files("`plsc/engine/step.py` and `plsc/nothing_here.py`") == {"plsc/engine/step.py",
                                                                                 "plsc/nothing_here.py"}
    assert not (ROOT / "plsc/nothing_here.py").is_file()

"""README's command table is complete: every preset of build/presets.py and every make target."""

from __future__ import annotations

import re
from pathlib import Path

from build.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _make_targets() -> set[str]:
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    return set(phony[1].split())


def test_every_preset_is_in_the_readme():
    missing = [name for name in PRESETS if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", README)]
    assert not missing, f"presets of build/presets.py that README.md does not name: {missing}"


def test_every_make_target_is_in_the_readme():
    assert {"setup", "test", "demo", "build", "serve"} <= _make_targets()  # the parse found the targets
    missing = sorted(t for t in _make_targets() if f"`make {t}" not in README)
    assert not missing, f"make targets README.md does not show: {missing}"

"""A training stage's progress on disk (shapes demo model): saved every SAVE_SECONDS and when the stage
ends, so a killed run resumes where it was. Every step draws its data from its own seed, so a resumed run
draws what the uninterrupted one would have."""

from __future__ import annotations

import time
from pathlib import Path

import torch

SAVE_SECONDS = 120.0


class Progress:
    def __init__(self, path: Path, **parts):
        # parts: name -> anything with state_dict() / load_state_dict() (modules, optimizers, schedulers)
        self.path, self.parts, self.saved_at = path, parts, time.monotonic()
        self.extra: dict = {}

    def resume(self) -> int:
        """Loads the saved state into the parts -> the step to continue from (0: nothing saved)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=False)
        for name, part in self.parts.items():
            part.load_state_dict(state["parts"][name])
        self.extra = state["extra"]
        return int(state["step"])

    def save(self, step: int, force: bool = False, **extra) -> None:
        """`step` steps done; written when forced or SAVE_SECONDS after the last save."""
        if not force and time.monotonic() - self.saved_at < SAVE_SECONDS:
            return
        self.extra = extra
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save({"step": step, "extra": extra, "parts": {n: p.state_dict() for n, p in self.parts.items()}}, partial)
        partial.replace(self.path)  # a kill while saving leaves the previous state whole
        self.saved_at = time.monotonic()

"""A module-scoped fixture of Pipelines by (checkpoint, vision backend): each is loaded on first use
and closed when the test module ends. Import `pipelines` into a test module to use it."""

from __future__ import annotations

import pytest

from engine.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipelines():
    made: dict[tuple, Pipeline] = {}

    def get(path, backend: str) -> Pipeline:
        if (path, backend) not in made:
            made[path, backend] = Pipeline.from_pretrained(path, vision_backend=backend)
        return made[path, backend]

    yield get
    for pipe in made.values():
        pipe.close()

"""The ONNX Runtime backend exports the vision graph on first use (issue 11, item 8): next to the
checkpoint, or in a per-user cache when the checkpoint folder is read-only; reused while the
export stamp (checkpoint files, graph code, torch) holds."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from engine import vision_export
from engine.config import ModelConfig
from engine.pipeline import Pipeline
from engine.vision import TorchVisionEncoder, default_onnx_path


@pytest.fixture
def fresh_checkpoint(tiny, tmp_path):
    """The tiny checkpoint without its ONNX export."""
    return shutil.copytree(tiny, tmp_path / "ckpt", ignore=shutil.ignore_patterns("onnx"))


def _tiles(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 3, 448, 448), dtype=np.uint8)


def test_pipeline_exports_the_vision_onnx_on_first_use_and_reuses_it(fresh_checkpoint, capsys):
    assert not default_onnx_path(fresh_checkpoint).exists()
    pipe = Pipeline.from_pretrained(fresh_checkpoint)  # the default backend: onnxruntime
    assert "exporting the vision encoder to" in capsys.readouterr().err
    assert default_onnx_path(fresh_checkpoint).is_file()
    reference = TorchVisionEncoder(ModelConfig.from_pretrained(fresh_checkpoint))
    ours, theirs = pipe.vision.encode(_tiles(1)), reference.encode(_tiles(1))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - pipe.vision.encode(_tiles(2))).max() > 1e-2  # the export depends on the tiles
    pipe.close()

    Pipeline.from_pretrained(fresh_checkpoint).close()
    assert capsys.readouterr().err == ""  # stamp unchanged: reused

    config = fresh_checkpoint / "config.json"
    config.write_text(config.read_text())  # a changed checkpoint file: exported again
    Pipeline.from_pretrained(fresh_checkpoint).close()
    assert "exporting the vision encoder to" in capsys.readouterr().err


def test_read_only_checkpoint_exports_to_the_per_user_cache(fresh_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    writable = os.access

    def read_only_store(path, mode):  # tests run as root, for whom chmod does not bite
        inside = str(path).startswith(str(fresh_checkpoint))
        return False if inside and mode & os.W_OK else writable(path, mode)

    monkeypatch.setattr(vision_export.os, "access", read_only_store)
    first = vision_export.ensure_vision_onnx(fresh_checkpoint)
    assert "exporting" in capsys.readouterr().err
    assert first.parent.parent == tmp_path / "cache" / "internvl-serve" / "vision" and first.is_file()
    assert not default_onnx_path(fresh_checkpoint).parent.exists()  # nothing written into the store
    assert vision_export.ensure_vision_onnx(fresh_checkpoint) == first
    assert capsys.readouterr().err == ""

"""The ONNX Runtime backend exports the vision graph on first use (issue 11, item 8): next to the
checkpoint, or in a per-user cache when the checkpoint folder is read-only; reused while the
export stamp (checkpoint files, graph code, torch) holds."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("external_data", [False, True], ids=["one-file", "external-data"])
def test_concurrent_first_uses_export_once_and_readers_never_see_a_partial_file(fresh_checkpoint, monkeypatch, capsys, external_data):
    """Two first uses at once (two threads here; the lock is a file lock, so processes alike) while the
    export writes slowly: the second waits and reuses the first's export, and whoever looks at the
    final paths meanwhile sees nothing or the whole graph with its whole data file, never a part."""
    if external_data:  # the > 1.8 GB case (weights beside the graph), forced on the tiny checkpoint
        monkeypatch.setattr(vision_export, "EXTERNAL_DATA_BYTES", 0)
    real_save = torch.onnx.ONNXProgram.save
    saving, saves = threading.Event(), []

    def slow_save(program, destination, **kwargs):  # writes as a slow disk would: 20 pieces, 20 ms apart
        saves.append(destination)
        real_save(program, destination, **kwargs)
        for written in (Path(f"{destination}.data"), Path(destination)):
            if written.is_file():
                data = written.read_bytes()
                with open(written, "wb") as f:
                    saving.set()
                    for start in range(0, len(data), len(data) // 20 + 1):
                        f.write(data[start : start + len(data) // 20 + 1])
                        f.flush()
                        time.sleep(0.02)

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", slow_save)
    onnx_file = default_onnx_path(fresh_checkpoint)
    data_file = Path(f"{onnx_file}.data")
    seen, done = [], threading.Event()

    def watch():  # until the exports are done and it has looked at the final file at least once
        while not done.is_set() or (not seen and onnx_file.exists()):
            if onnx_file.exists():
                seen.append((onnx_file.read_bytes(), data_file.read_bytes() if data_file.exists() else None))
            time.sleep(0.001)

    results = []
    first = threading.Thread(target=lambda: results.append(vision_export.ensure_vision_onnx(fresh_checkpoint)))
    second = threading.Thread(target=lambda: results.append(vision_export.ensure_vision_onnx(fresh_checkpoint)))
    watcher = threading.Thread(target=watch)
    watcher.start()
    first.start()
    assert saving.wait(120)
    second.start()  # while the first export is being written
    first.join(120)
    second.join(120)
    done.set()
    watcher.join()
    assert results == [onnx_file, onnx_file]
    assert len(saves) == 1 and capsys.readouterr().err.count("exporting the vision encoder") == 1
    final = (onnx_file.read_bytes(), data_file.read_bytes() if external_data else None)
    assert data_file.exists() == external_data
    partial = [len(onnx) for onnx, data in seen if (onnx, data) != final]
    assert seen and not partial, f"partial reads (graph bytes {partial}, whole {len(final[0])})"

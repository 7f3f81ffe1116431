"""llama.cpp's own converter, convert_hf_to_gguf.py, taken from the llama-cpp-python sdist of the installed
version, turning the HF directory of bench_components/peers_checkpoint.py into f32 / f16 / q8_0 GGUFs.

The script, its `conversion/` package (it imports it since llama.cpp split the model classes out) and
its `gguf-py/` are extracted once from `pip download --no-binary :all: --no-deps
llama-cpp-python==<version>` into artifacts/bench/peers/llama.cpp-<version>/ and run unmodified. The
script puts its own gguf-py first on sys.path, and it needs it: the vendored copy says 0.19.0 like the
gguf release of the `peers` extra but is newer (the converter's qwen.py refers to MODEL_ARCH.DFLASH,
which the released 0.19.0 lacks). The released gguf only reads the finished files
(bench_components/peers.py records their tensor types with it).

The vocabulary: for a GPT-2-style BPE tokenizer the converter names the pre-tokenizer by hashing the
ids that tokenizer gives a fixed text and looking the hash up among published tokenizers
(TextModel.get_vocab_base_pre); ours, trained on build/corpus.txt, is in no such list, so the lookup
raises "BPE pre-tokenizer was not recognized". The converter runs here through a shim (this module's
`--shim`) that catches exactly that and answers "gpt-2", the name the converter gives GPT-2's own
tokenizer and llama.cpp's vocabulary loader accepts, which is what our tokenizer is: byte-level BPE
with the GPT-2 split regex (build/checkpoint.py train_tokenizer: ByteLevel(add_prefix_space=False),
use_regex on). Everything else — vocabulary, token types, merges, special ids — the converter reads
from our tokenizer files itself. The race feeds token ids directly, so tokenization never runs on the
llama.cpp side; the shim is only needed to get a loadable GGUF.
"""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

OUTTYPES = ("f32", "f16", "q8_0")
DEFAULT_VERSION = "0.3.36"  # pyproject.toml's `peers` extra
SCRIPT = "convert_hf_to_gguf.py"
PACKAGE = "conversion"
GGUF_PY = "gguf-py"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for openai-community/gpt2's pre-tokenizer (llama-vocab.cpp)


def llama_cpp_python_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return DEFAULT_VERSION


def fetch_converter(cache: Path, version: str) -> Path:
    """-> the directory holding convert_hf_to_gguf.py and conversion/ of llama-cpp-python `version`."""
    target = cache / f"llama.cpp-{version}"
    if all((target / p).is_file() for p in (SCRIPT, f"{PACKAGE}/__init__.py", f"{GGUF_PY}/gguf/__init__.py")):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(Path(tmp), version)
        staging = Path(tmp) / "x"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if _wanted(m.name)]
            if not any(m.name.endswith("/" + SCRIPT) for m in members):
                raise FileNotFoundError(f"{sdist.name} has no vendor/llama.cpp/{SCRIPT}")
            tar.extractall(staging, members=members, filter="data")
        root = next(staging.glob("*/vendor/llama.cpp"))
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.copy2(root / SCRIPT, target / SCRIPT)
        shutil.copytree(root / PACKAGE, target / PACKAGE)
        shutil.copytree(root / GGUF_PY / "gguf", target / GGUF_PY / "gguf")
    return target


def download_sdist(directory: Path, version: str) -> Path:
    """-> llama-cpp-python `version`'s sdist (it vendors llama.cpp), downloaded into directory."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={version}", "-d", str(directory)],
        check=True,
    )
    (sdist,) = directory.glob("llama_cpp_python-*.tar.gz")
    return sdist


def _wanted(name: str) -> bool:
    parts = name.split("/")
    return parts[1:3] == ["vendor", "llama.cpp"] and (parts[3:] == [SCRIPT] or parts[3:4] == [PACKAGE] or parts[3:5] == [GGUF_PY, "gguf"])


def convert(hf_dir: Path, converter: Path, out_dir: Path, outtypes=OUTTYPES, log=print, mmproj: bool = False) -> dict[str, Path]:
    """-> {outtype: gguf path}; a GGUF already made from this exact directory by this converter is kept.
    hf_dir: an HF causal-LM directory (peers_checkpoint.py) or a generated InternVL checkpoint in the
    custom format, whose language model (llm_config) the converter takes, or with mmproj=True its
    vision tower + mlp1 (InternVisionModel: conversion/internvl.py) as the multimodal projector file."""
    source = next(hf_dir / name for name in ("extracted_from.json", "generated_by.json") if (hf_dir / name).is_file())
    stamp = {"hf_dir": json.loads(source.read_text(encoding="utf-8")), "converter": converter.name, "pre_tokenizer": PRE_TOKENIZER}
    if mmproj:
        stamp["mmproj"] = True
    paths = {}
    for outtype in outtypes:
        # a name with "mmproj" in it: the converter would prefix one otherwise
        path = out_dir / f"{hf_dir.name}-{'mmproj-' if mmproj else ''}{outtype}.gguf"
        stamp_file = path.with_suffix(".json")
        if path.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
            paths[outtype] = path
            continue
        start = time.perf_counter()
        log(f"peers: {converter.name}/{SCRIPT} --outtype {outtype} -> {path}")
        cmd = [sys.executable, "-m", "bench_components.peers_convert", "--shim", str(converter), "--outtype", outtype, "--outfile", str(path), str(hf_dir)]
        cmd += ["--mmproj"] if mmproj else []
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{SCRIPT} --outtype {outtype} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        for line in result.stderr.splitlines():
            if line.startswith("peers shim:"):
                log(line)
        stamp_file.write_text(json.dumps(stamp), encoding="utf-8")
        log(f"peers: {path.name} {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        paths[outtype] = path
    return paths


def unknown_bpe_answer(original):
    """Wraps TextModel.get_vocab_base_pre: a tokenizer the converter does not know by its hash is named
    PRE_TOKENIZER; a known one keeps the converter's own answer."""

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError as error:
            if "pre-tokenizer was not recognized" not in str(error):
                raise
            print(f"peers shim: tokenizer not in the converter's hash list; pre-tokenizer = {PRE_TOKENIZER!r}", file=sys.stderr)
            return PRE_TOKENIZER

    return get_vocab_base_pre


def run_shim(converter: Path, args: list[str]) -> None:
    """Runs convert_hf_to_gguf.py from `converter` as __main__ with `args`, the pre-tokenizer lookup wrapped.
    Its gguf-py goes first on sys.path before conversion.base imports gguf (as the script itself does)."""
    sys.path[:0] = [str(converter), str(converter / GGUF_PY)]
    from conversion.base import TextModel  # the converter's own package (fetch_converter)

    TextModel.get_vocab_base_pre = unknown_bpe_answer(TextModel.get_vocab_base_pre)
    sys.argv = [str(converter / SCRIPT), *args]
    runpy.run_path(str(converter / SCRIPT), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--shim":
        sys.exit("usage: python -m bench_components.peers_convert --shim CONVERTER_DIR [convert_hf_to_gguf.py args]")
    run_shim(Path(sys.argv[2]), sys.argv[3:])

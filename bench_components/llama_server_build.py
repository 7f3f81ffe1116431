"""llama.cpp's `llama-server` (with its multimodal library, mtmd), built from the llama.cpp source vendored
in the llama-cpp-python sdist of the installed version (the `peers` extra), for CPU, once, cached.

    python -m bench_components.llama_server_build [--cache DIR] [--jobs N]

The sdist is `pip download --no-binary :all: --no-deps llama-cpp-python==<version>` (0.3.36 vendors
ggml-org/llama.cpp@0c1e57098, its CHANGELOG.md). CMake options (vendor/llama.cpp/CMakeLists.txt,
tools/server/CMakeLists.txt, scripts/ui-assets.cmake): Release, GGML_NATIVE for this CPU as the Python
build of `make bench-peers` (PEERS_CMAKE_ARGS), no BLAS; tests, examples and the web UI off (the
prebuilt UI would be downloaded at build time, and the benchmark needs only the HTTP API); static
libraries, so the binary is self-contained. The first build compiles ~300 C/C++ files: minutes on 2
cores (the time is logged); later calls find the binary and return at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from bench_components.common import ROOT, log
from bench_components.peers_convert import download_sdist, llama_cpp_python_version

DEFAULT_CACHE = ROOT / "artifacts" / "bench" / "peers"
VENDORED_COMMITS = {"0.3.36": "0c1e57098"}  # llama-cpp-python -> llama.cpp commit (its CHANGELOG.md)
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_BLAS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


def server_binary(cache: Path, version: str) -> Path:
    return cache / f"llama-server-{version}" / "bin" / "llama-server"


def cmake_command(source: Path, build: Path, version: str) -> list[str]:
    commit = VENDORED_COMMITS.get(version)
    stamp = [f"-DLLAMA_BUILD_COMMIT={commit}"] if commit else []  # the sdist has no git metadata to read it from
    return ["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *CMAKE_OPTIONS, *stamp]


def ensure_llama_server(cache: Path = DEFAULT_CACHE, version: str | None = None, jobs: int | None = None) -> Path:
    """-> the llama-server binary of llama-cpp-python `version` (default: the installed one), built if missing."""
    version = version or llama_cpp_python_version()
    binary = server_binary(cache, version)
    if binary.is_file():
        return binary
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama-server needs {tool} on PATH")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache if cache.is_dir() else None) as tmp:
        source = _unpack_sdist(Path(tmp), version)
        build = Path(tmp) / "build"
        log(f"llama-server {version}: configuring {source}")
        subprocess.run(cmake_command(source, build, version), check=True, stdout=subprocess.DEVNULL)
        log(f"llama-server {version}: compiling (first time only; minutes on 2 cores)")
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 1)], check=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    log(f"llama-server {version}: built in {time.perf_counter() - started:.0f} s -> {binary}")
    return binary


def _unpack_sdist(tmp: Path, version: str) -> Path:
    """-> vendor/llama.cpp of the llama-cpp-python `version` sdist, unpacked under tmp."""
    with tarfile.open(download_sdist(tmp, version)) as tar:
        tar.extractall(tmp / "src", filter="data")
    return next((tmp / "src").glob("*/vendor/llama.cpp"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench_components.llama_server_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the binary is kept (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: every core)")
    args = parser.parse_args(argv)
    print(ensure_llama_server(args.cache, jobs=args.jobs))


if __name__ == "__main__":
    main()

"""The CPU LLM's compiled kernels (engine/llm/csrc/): the int8 weight product (engine/llm/int8.py),
the fp32 weight product for decode rows (engine/llm/linear.py), and the fused RMSNorm and q/k norm + rotary embedding of a decoder layer (engine/llm/model.py).

One torch C++ extension, compiled once: `make setup` runs `python -m engine.llm.cpu_ops`, which
builds it with torch.utils.cpp_extension under TORCH_EXTENSIONS_DIR (by default
~/.cache/torch_extensions), named after a hash of the sources, flags and torch's version, so an
edited kernel never loads a stale build. Where it cannot be built or loaded (no compiler, no AVX2),
`load()` returns None with the reason: the model then runs the same arithmetic as torch operators
(slower per step), and llm_weights="int8" serves float16 with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "bindings.cpp", CSRC / "int8_linear.cpp", CSRC / "dense_linear.cpp", CSRC / "decode_ops.cpp"]
# -ffp-contract=off: a*b + c*d stays two roundings, as torch's separate operators compute it.
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers (serial without it), linked to the
# libgomp torch itself loads, so one OpenMP runtime and thread pool serve both.
TORCH_LIB = Path(torch.__file__).parent / "lib"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = [f"-L{TORCH_LIB}", "-l:libgomp.so.1", f"-Wl,-rpath,{TORCH_LIB}"]


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.cache
def load():
    """-> (the compiled module or None, the reason it is None)."""
    if not _cpu_has_avx2():
        return None, "this CPU has no AVX2/FMA"
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for source in sorted(CSRC.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(torch.__version__.encode() + " ".join(CFLAGS + LDFLAGS).encode())
    # torch's build runs `ninja`; the pinned wheel puts it next to this interpreter
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    name = f"internvl_cpu_ops_{digest.hexdigest()[:12]}"
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / name
    library = build / f"{name}.so"
    # A built library is imported as it is: cpp_extension.load would run ninja again, which rebuilds
    # whenever the compile command differs — and a Triton python-backend stub's Python reports other
    # include paths than the venv's, so the two would rebuild it in turn. The name pins the sources.
    if library.exists() and not (build / "lock").exists():
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, ""
    build.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(build), verbose=False
        )
    except Exception as error:  # a missing compiler or headers: torch operators instead
        return None, f"the CPU kernels did not build: {type(error).__name__}: {str(error).strip()[-400:]}"
    return module, ""


if __name__ == "__main__":  # `make setup`: compile once, so the first server start does not
    module, reason = load()
    print("CPU kernels:", "built" if module is not None else f"unavailable ({reason}); torch operators and float16 for int8 instead")

"""The CPU LLM's compiled kernels (engine/llm/csrc/): the int8 weight product (engine/llm/int8.py),
and the fused RMSNorm and q/k norm + rotary embedding of a decoder layer (engine/llm/model.py).

One torch C++ extension, compiled once: `make setup` runs `python -m engine.llm.cpu_ops`;
torch.utils.cpp_extension caches it under TORCH_EXTENSIONS_DIR (by default
~/.cache/torch_extensions), named after a hash of the sources and torch's version, so an edited
kernel never loads a stale build. Where it cannot be built or loaded (no compiler, no AVX2),
`load()` returns None with the reason: the model then runs the same arithmetic as torch operators
(slower per step), and llm_weights="int8" serves float16 with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "bindings.cpp", CSRC / "int8_linear.cpp", CSRC / "decode_ops.cpp"]
# -ffp-contract=off: a*b + c*d stays two roundings, as torch's separate operators compute it
CFLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-ffp-contract=off"]


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
    digest.update(torch.__version__.encode() + " ".join(CFLAGS).encode())
    # torch's build runs `ninja`; the pinned wheel puts it next to this interpreter
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        module = cpp_extension.load(
            name=f"internvl_cpu_ops_{digest.hexdigest()[:12]}",
            sources=[str(s) for s in SOURCES],
            extra_cflags=CFLAGS,
            verbose=False,
        )
    except Exception as error:  # a missing compiler or headers: torch operators instead
        return None, f"the CPU kernels did not build: {type(error).__name__}: {str(error).strip()[-400:]}"
    return module, ""


if __name__ == "__main__":  # `make setup`: compile once, so the first server start does not
    module, reason = load()
    print("CPU kernels:", "built" if module is not None else f"unavailable ({reason}); torch operators and float16 for int8 instead")

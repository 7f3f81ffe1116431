"""triton_repo.allocator: tritonserver maps big buffers (returned on free), the stubs keep glibc's usual heap use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from triton_repo import allocator

# mallinfo2().hblkhd: bytes glibc holds in mmapped chunks (glibc >= 2.33)
PROBE = """
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "stub":
    from triton_repo import allocator
    assert allocator.stub_settings()
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(4 << 20))  # with glibc's dynamic threshold, this free raises the threshold past 4 MiB
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print(json.dumps({"mapped": libc.mallinfo2().hblkhd - before}))
"""


def _mapped_bytes(role: str, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, role], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["mapped"]


@pytest.fixture
def glibc():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")


def test_server_environment_maps_a_4_mib_buffer_and_stub_settings_undo_it(glibc):
    import os

    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"PYTHONPATH": os.getcwd()}
    assert _mapped_bytes("server", plain) == 0  # glibc's default: the second 4 MiB block comes from the heap
    env = plain | allocator.server_environment()
    assert _mapped_bytes("server", env) >= 4 << 20  # fixed threshold: its own mapping, unmapped on free
    assert _mapped_bytes("stub", env) == 0  # below the stubs' 32 MiB threshold: from the heap


def test_tritonserver_gets_the_allocator_environment(tmp_path):
    from launcher.server import TritonServer

    server = TritonServer(tmp_path)
    assert server.environment()["MALLOC_MMAP_THRESHOLD_"] == str(allocator.SERVER_MMAP_THRESHOLD)

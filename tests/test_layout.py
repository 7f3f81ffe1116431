"""Package boundaries: triton_repo/ holds only what runs inside tritonserver, the launcher is its own
package, and client/ and openai_api/ share the Triton protocol through engine/protocol.py and
tritonclient's public API (no private attributes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level project packages it must not import
FORBIDDEN = {
    "triton_repo": {"launcher", "openai_api", "client", "build"},
    "openai_api": {"client", "launcher", "triton_repo", "build"},
    "client": {"openai_api", "triton_repo"},  # the demo and benchmarks start servers through launcher/
    "engine": {"openai_api", "launcher", "triton_repo", "client", "build"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_their_job_needs(package):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    }
    assert not wrong


def test_client_speaks_only_triton_protocols():
    """In-process benchmarks (engine's Pipeline, LLM engine, vision encoder) live in bench_components/."""
    in_process = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "client").rglob("*.py")
        for name in _imports(path)
        if name.startswith(("engine.pipeline", "engine.llm", "engine.vision"))
    }
    assert not in_process and not (ROOT / "client" / "bench_components").exists()


def test_the_launcher_is_outside_the_model_repository():
    assert not {"server.py", "launch_gpu.py", "kube_exec.py"} & {p.name for p in (ROOT / "triton_repo").glob("*.py")}
    assert {"server.py", "gpu.py", "kube_exec.py", "openai_process.py"} <= {p.name for p in (ROOT / "launcher").glob("*.py")}


def test_no_private_tritonclient_attributes():
    """A private attribute (e.g. `_client_stub`) may change in any tritonclient release."""
    private = {
        f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}"
        for package in ("openai_api", "client", "launcher", "engine")
        for path in (ROOT / package).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_client")
    }
    assert not private

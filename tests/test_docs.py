"""The documentation runs as written.

Every command in README.md and docs/*.md (code blocks, `# = …` equivalents in them, and inline
code that starts with a command) is checked:

- `make …`: the target exists and every VAR= is one the Makefile reads (`make -n`), and each
  `python -m <module> …` line make would run parses with that module's own argparse parser;
- `python -m <module> …` of this project: its exact argv parses with the module's parser (the
  parser main() builds, captured at its parse_args call); synopses with placeholders (`<dir>`,
  `[--flag …]`, `a\\|b`, `…`) only need their flags (and listed choices) to exist;
- `client.chat` and `curl` commands run against a real tritonserver (the `server` fixture), in a
  directory that holds the images they name; only the server's port is substituted;
- GPU-only commands are never run: `mpirun` flags are checked against the command
  launcher.gpu builds, `tritonserver` flags against `tritonserver --help`, `docker` flags
  against the `docker run` options the docs use;
- flags quoted on their own (`--max-images`) exist in a module the same table row, paragraph or
  section runs.

The README's Python example runs as written in a directory laid out as after `make build`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from openai_api.server import running_server
from openai_api.settings import Settings
from tests.doc_commands import (
    COMMANDS,
    DOCKER_BUILD_OPTIONS,
    DOCKER_RUN_OPTIONS,
    DOCS,
    DOC_DATA,
    PROJECT,
    PYTHONS,
    ROOT,
    RUNNABLE,
    SAMPLE,
    argv_of,
    bash_argv,
    check_flags,
    check_make,
    check_module_command,
    check_mpirun,
    module_ref,
    modules_of,
    synopsis_argv,
    tritonserver_options,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with the images the docs name and a .venv link, as the docs' commands expect."""
    path = tmp_path_factory.mktemp("docs")
    for name in ("a.jpg", "photo.jpg"):
        shutil.copy(SAMPLE, path / name)
    Image.open(SAMPLE).save(path / "b.png")
    (path / ".venv").symlink_to(ROOT / ".venv")
    return path


def test_docs_have_commands():
    kinds = {c.words[0] for c in COMMANDS}
    assert {"make", ".venv/bin/python", "curl", "mpirun"} <= kinds
    assert len(RUNNABLE) >= 4


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.words[0]}" for c in COMMANDS])
def test_every_doc_command_is_valid(command, workdir):
    argv = argv_of(command, workdir)
    program = argv[0]
    if not command.synopsis:
        literal = [a for a in argv if "\\n" in a]
        assert not literal, f"{command.where}: a literal \\n reaches the program (use $'…' or a newline): {literal}"
    if program == "make":
        check_make(argv, command.synopsis)
    elif Path(program).name in PYTHONS:
        assert argv[1] == "-m", f"{command.where}: python without -m"
        if len(argv) > 3 or not command.inline:  # an inline `python -m module` alone names the module
            check_module_command(argv[2], argv[3:], command.synopsis)
    elif module_ref(program):  # build/export_vision.py --ragged ...: the module's flags
        check_flags(module_ref(program), argv[1:])
    elif program == "mpirun":
        check_mpirun(argv)
    elif program == "tritonserver":
        check_flags("tritonserver", argv[1:], tritonserver_options())
    elif program == "docker":
        assert argv[1] in ("run", "build"), argv[1]
        known = DOCKER_RUN_OPTIONS if argv[1] == "run" else DOCKER_BUILD_OPTIONS
        unknown = [a for a in argv[2:] if a.startswith("-") and a not in known]
        assert not unknown, f"docker {argv[1]} options not in the reference: {unknown}"
        if argv[1] == "build":  # the Dockerfile it names exists
            assert (ROOT / argv[argv.index("-f") + 1]).is_file()
    elif program == "kubectl":
        assert argv[1:3] == ["apply", "-f"] and len(argv) == 4, argv
    elif program == "curl":
        assert not command.synopsis and command in RUNNABLE
    else:
        pytest.fail(f"{command.where}: no check for {program}")


@pytest.mark.parametrize("doc", sorted(DOC_DATA))
def test_every_quoted_flag_exists(doc):
    """`--flag` quoted in a table row, paragraph or section exists in a module run or named there."""
    data = DOC_DATA[doc]
    runs: dict[tuple, set[str]] = {}
    for command in data.commands:
        for key in (command.unit, command.section):
            runs.setdefault(key, set()).update(modules_of(command))
            if command.words[0] in ("tritonserver", "mpirun"):
                runs[key].add("tritonserver")
    checked = 0
    for where, span, section, unit in data.flag_spans:
        modules = runs.get(unit, set()) | runs.get(section, set())
        modules |= data.module_refs.get(unit, set()) | data.module_refs.get(section, set())
        modules = {m for m in modules if m == "tritonserver" or m.startswith(PROJECT)}
        if not modules:
            continue  # another tool's flag (e.g. TensorRT-LLM's --max_multimodal_len)
        argv = synopsis_argv(span)
        errors = []
        for module in sorted(modules):
            try:
                options = tritonserver_options() if module == "tritonserver" else None
                check_flags(module, argv, options)
                break
            except AssertionError as e:
                errors.append(str(e).split(" (has")[0])
        else:
            pytest.fail(f"{where}: `{span}`: {'; '.join(errors)}")
        checked += 1
    assert checked or not data.flag_spans


@pytest.mark.parametrize("command", RUNNABLE, ids=[c.where for c in RUNNABLE])
def test_doc_client_commands_run_against_a_server(command, server, workdir):
    """As written, in a directory holding a.jpg, b.png and photo.jpg; only the server's ports change."""
    text = command.text.replace("127.0.0.1:8000", server.http_url).replace("localhost:8000", server.http_url)
    text = text.replace("127.0.0.1:8001", server.grpc_url)
    if "client.chat" in text and "--url" not in text:
        text = text.replace("client.chat", f"client.chat --url {server.grpc_url}", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    stdin = "Describe the image.\nAnd the colours?\n" if "--interactive" in text else None
    with running_server(Settings(triton_url=server.grpc_url, port=0, served_model_name="tiny-qwen3")) as openai_url:
        text = text.replace("http://127.0.0.1:9000", openai_url)
        result = subprocess.run(["bash", "-c", text], cwd=workdir, env=env, input=stdin, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command.where}: {command.text}\n{result.stderr}"
    assert "error" not in result.stderr.lower(), result.stderr
    if command.words[0] == "curl" and "/v1/chat/completions" in text:  # the OpenAI server (docs/API.md)
        reply = json.loads(result.stdout)
        assert reply["model"] == "tiny-qwen3" and reply["choices"][0]["message"]["content"].strip()
    elif command.words[0] == "curl":
        reply = json.loads(result.stdout)
        assert reply["model_name"] == "internvl" and reply["text_output"].strip()
    elif "--interactive" in text:
        replies = [r for r in result.stdout.split("> ") if r.strip()]
        assert len(replies) == 2, result.stdout
    else:
        assert result.stdout.strip()


def test_readme_multi_image_example_sends_real_newlines(workdir):
    tagged = [c for c in DOC_DATA["README.md"].commands if "client.chat" in c.text and "Image-1: <image>" in c.text]
    assert tagged
    for command in tagged:
        question = bash_argv(command.text, workdir)[-1]
        assert question == "Image-1: <image>\nImage-2: <image>\nCompare them."


def test_commands_are_in_fenced_blocks():
    """An indented command (a Markdown indented code block) would escape every check above."""
    indented = []
    for path in DOCS:
        fenced = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fenced ^= line.startswith("```")
            if not fenced and re.match(r" {4,}(curl|make|python3?|\.venv/bin/python|docker|kubectl|tritonserver) ", line):
                indented.append(f"{path.name}:{number}")
    assert not indented, f"put these commands in ```sh blocks: {indented}"


def test_no_stale_later_issue_text():
    stale = [f"{p.name}:{n}" for p in DOCS for n, line in enumerate(p.read_text().splitlines(), 1) if "later issue" in line]
    assert not stale, f"'later issue' left in {stale}"


def test_cpu_only_cuda_log_lines_are_explained_in_the_docs(server):
    """Each warning or error line of a healthy CPU server's log is one docs/SERVING.md explains."""
    serving = (ROOT / "docs" / "SERVING.md").read_text(encoding="utf-8")
    log = Path(server.log_file).read_text(encoding="utf-8", errors="replace").splitlines()
    lines = [m for line in log if (m := re.match(r'[EW]\d{4} [\d:.]+ +\d+ (\S+:\d+)\] "?(.*?)"?$', line))]
    assert lines, "a CPU-only tritonserver logs CUDA warnings; none found"
    unexplained = [f"{m[1]}] {m[2]}" for m in lines if f'{m[1]}] "{m[2]}"' not in serving]
    assert not unexplained, f"not explained in docs/SERVING.md: {unexplained}"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """In a directory laid out as after `make build`: the generated demo checkpoint (without an ONNX
    of its own) in artifacts/checkpoints/tiny-qwen3, the build in artifacts/build, and the images
    and the video the example names."""
    from build.checkpoint import generate
    from build.repository import build
    from tests.video_files import encode, frames

    blocks = _python_blocks(ROOT / "README.md")
    assert blocks
    checkpoint = generate("tiny", "qwen3", tmp_path / "artifacts" / "checkpoints" / "tiny-qwen3")
    with contextlib.redirect_stdout(io.StringIO()):
        build(checkpoint, tmp_path / "artifacts" / "build")
    assert not (checkpoint / "onnx").exists()
    shutil.copy(SAMPLE, tmp_path / "photo.jpg")
    shutil.copy(SAMPLE, tmp_path / "a.jpg")
    Image.open(SAMPLE).resize((320, 640)).save(tmp_path / "b.png")
    encode(tmp_path / "clip.mp4", frames(30, 320, 180), 25)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {"__name__": "readme"}
        exec(compile(block, "README.md", "exec"), namespace)
        pipe = namespace.get("pipe")
        try:
            if "result" in namespace:
                result, history = namespace["result"], namespace["history"]
                assert history[0][0] == "<image>\n<image>\nCompare." and history[0][1].strip()
                assert isinstance(namespace["reply"], str) and namespace["reply"].strip()
                assert result.finish_reason in ("stop", "length") and 0 < len(result.token_ids) <= 32
                assert result.prompt_tokens > 0
                assert capsys.readouterr().out.strip()  # the streamed story
        finally:
            getattr(pipe, "close", lambda: None)()

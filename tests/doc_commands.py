"""Reading the documentation's commands and checking them against the code they call: the parsers
of this project's modules, the Makefile, tritonserver's and the GPU launcher's options. Used by
tests/test_docs.py."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock


ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HELP_EXAMPLES = [ROOT / "client" / "chat.py"]  # its docstring is `python -m client.chat --help`
SAMPLE = ROOT / "client" / "samples" / "lake_house.jpg"
PYTHONS = {"python", "python3", ".venv/bin/python"}
COMMAND_WORDS = PYTHONS | {"make", "curl", "mpirun", "docker", "tritonserver"}
PROJECT = ("build", "client", "bench_components", "triton_repo", "launcher", "engine", "openai_api")
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
PLACEHOLDER = re.compile(r"<(?!image>)[^<>\s][^<>]*>")  # <dir>, <internvl checkpoint>; not the <image> tag
CAPS_PLACEHOLDER = re.compile(r"(?<![\w=/.$-])[A-Z]{1,5}(?![\w=])")  # DIR, FILE, N (not MODEL=…)
OPERATORS = {"||", "&&", ";", "|", ">", ">>", "<", "2>", "&"}
# `docker run` options the docs use (docs.docker.com/reference/cli/docker/container/run/)
DOCKER_RUN_OPTIONS = {"--gpus", "--shm-size", "-v", "--volume", "-w", "--workdir", "-i", "-t", "-it", "--rm", "--ipc", "-p", "--publish", "-e", "--env"}
DOCKER_BUILD_OPTIONS = {"-f", "--file", "-t", "--tag"}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written (a block's continuation lines joined)
    inline: bool
    section: tuple[str, str, int]  # (file, "section", heading index)
    unit: tuple[str, str, int]  # (file, "unit", paragraph / table row / list item index): never equal to a section's key

    @property
    def words(self) -> list[str]:
        return self.text.split()

    @property
    def synopsis(self) -> bool:
        text = self.text.split(" #")[0]
        optional = re.search(r"(^|\s)\[[-\w]", text)  # [--flag …], [VAR=…]; not a JSON list
        return bool(PLACEHOLDER.search(text) or optional or re.search(r"…|\.\.\.|\\\|", text) or CAPS_PLACEHOLDER.search(text))


@dataclass
class Doc:
    commands: list[DocCommand] = field(default_factory=list)
    flag_spans: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # (where, span, section, unit)
    module_refs: dict[tuple, set[str]] = field(default_factory=dict)  # unit or section -> modules named there


def _complete(text: str) -> bool:
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def _is_command(text: str) -> bool:
    words = text.split()
    return len(words) >= 2 and words[0] in COMMAND_WORDS


@functools.cache
def _runnable_module(name: str) -> bool:
    """A module of this project that `python -m` runs (a main() or a package __main__)."""
    parts = name.split(".")
    path = ROOT.joinpath(*parts)
    if (path / "__main__.py").is_file():
        return True
    source = path.with_suffix(".py")
    return source.is_file() and "\ndef main(" in source.read_text(encoding="utf-8")


def module_ref(span: str) -> str | None:
    """`build.trt_vision` or `build/export_vision.py …` names a runnable module of this project."""
    name = None
    if re.fullmatch(r"(build|client|bench_components|triton_repo|launcher)\.\w+(\.\w+)?", span):
        name = span
    elif match := re.fullmatch(r"(build|client|bench_components|triton_repo|launcher)/(\w+)\.py", span.split()[0]):
        name = f"{match[1]}.{match[2]}"
    return name if name and _runnable_module(name) else None


def parse_doc(path: Path) -> Doc:
    doc = Doc()
    name = path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".py":  # the module docstring's indented example commands, as one code block
        docstring = lines[: lines.index('"""', 1)]
        lines = ["```sh", *(line.strip() if line.startswith("    ") else "" for line in docstring[1:]), "```"]
    section = unit = 0
    fence = None  # info string of the open code block
    pending: tuple[int, str] | None = None
    paragraph: list[tuple[int, str]] = []

    def flush_paragraph():
        if not paragraph:
            return
        first = paragraph[0][0]
        text = " ".join(line.strip() for _, line in paragraph)
        for span in re.findall(r"`([^`]+)`", text):
            span = span.strip()
            key_unit, key_section = (name, "unit", unit), (name, "section", section)
            ref = module_ref(span)
            if ref:
                for key in (key_unit, key_section):
                    doc.module_refs.setdefault(key, set()).add(ref)
            if _is_command(span) or (ref and len(span.split()) > 1):
                doc.commands.append(DocCommand(f"{name}:{first}", span, True, key_section, key_unit))
            elif span.startswith("--"):
                doc.flag_spans.append((f"{name}:{first}", span, key_section, key_unit))
        paragraph.clear()

    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            flush_paragraph()
            unit += 1
            fence = line[3:].strip() if fence is None else None
            continue
        if fence is not None:
            if fence not in SHELL_FENCES:
                continue
            if pending:
                pending = (pending[0], pending[1] + "\n" + line)
            else:
                stripped = line.strip()
                text = stripped[len("# = ") :] if stripped.startswith("# = ") else line
                if not _is_command(text.strip()):
                    continue
                pending = (number, text.strip())
            if _complete(pending[1]):
                doc.commands.append(DocCommand(f"{name}:{pending[0]}", pending[1], False, (name, "section", section), (name, "unit", unit)))
                pending = None
            continue
        if line.startswith("#"):
            flush_paragraph()
            section += 1
            unit += 1
            paragraph.append((number, line))
            flush_paragraph()
            unit += 1
            continue
        if not line.strip() or line.startswith("|") or re.match(r"\s*(\d+\.|[-*]) ", line):
            flush_paragraph()
            unit += 1
        if line.strip():
            paragraph.append((number, line))
        if line.startswith("|"):
            flush_paragraph()
            unit += 1
    flush_paragraph()
    return doc


DOC_DATA = {path.name: parse_doc(path) for path in [*DOCS, *HELP_EXAMPLES]}
COMMANDS = [c for doc in DOC_DATA.values() for c in doc.commands]
RUNNABLE = [c for c in COMMANDS if not c.synopsis and not c.inline and ("client.chat" in c.text or c.words[0] == "curl")]


# --- argv: as bash gives it (concrete commands) or with placeholders filled (synopses) -------------


def bash_argv(text: str, cwd: Path) -> list[str]:
    """The words bash makes of a command line: quotes, $'…' escapes, $(…) substitutions."""
    script = f"set -- {text}\nprintf '%s\\0' \"$@\""
    result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.split("\0")[:-1]


def synopsis_argv(text: str) -> list[str]:
    text = text.replace("\\\n", " ").replace("\\|", "|")  # continuation lines joined
    text = PLACEHOLDER.sub(lambda m: "" if "flag" in m[0] else "X", text)
    text = text.replace("[", " ").replace("]", " ")
    argv = []
    for word in shlex.split(text, comments=True):
        if word in ("…", "..."):
            continue
        word = word.replace("…", "X").replace("...", "X")
        argv.append(word)  # alternatives (a|b) stay: check_flags checks each against the choices
    return argv


def argv_of(command: DocCommand, cwd: Path) -> list[str]:
    return synopsis_argv(command.text) if command.synopsis else bash_argv(command.text, cwd)


# --- the project's argparse parsers ------------------------------------------------------------------


class _Captured(BaseException):
    pass


_PARSE_ARGS = argparse.ArgumentParser.parse_args


@functools.cache
def module_parser(name: str) -> argparse.ArgumentParser:
    """The parser `python -m name` uses: main() runs until its parse_args call, which is captured."""
    spec = importlib.util.find_spec(name)
    module = importlib.import_module(f"{name}.__main__" if spec.submodule_search_locations else name)
    captured = []

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), mock.patch.object(sys, "argv", [name]):
        try:
            module.main()
        except _Captured:
            pass
    assert captured, f"python -m {name}: main() never called parse_args"
    return captured[0]


def parse_exactly(name: str, args: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            _PARSE_ARGS(module_parser(name), args)
        except SystemExit as e:
            assert e.code in (0, None), f"python -m {name} {shlex.join(args)}: {err.getvalue().strip()}"


def check_flags(name: str, args: list[str], options: dict | None = None) -> None:
    """Every --flag exists; where a value lists alternatives (a|b), each is one of the flag's choices."""
    options = options if options is not None else module_parser(name)._option_string_actions
    for i, arg in enumerate(args):
        if not re.match(r"--?[A-Za-z]", arg):
            continue
        flag, _, value = arg.partition("=")
        assert flag in options, f"{name}: no option {flag} (has {', '.join(sorted(options))})"
        action = options[flag]
        if not value and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
        if getattr(action, "choices", None) and value and value != "X":
            for choice in value.split("|"):
                assert choice in map(str, action.choices), f"{name} {flag}: {choice!r} is not one of {list(action.choices)}"


def check_module_command(name: str, args: list[str], synopsis: bool) -> None:
    if not name.startswith(PROJECT):
        return  # pip, pytest: not ours
    if synopsis:
        check_flags(name, args)
    else:
        parse_exactly(name, args)


def module_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(module, args) of each `python -m module args` in a shell command (args end at an operator)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    found = []
    for i, word in enumerate(words[:-2]):
        if Path(word).name.startswith("python") and words[i + 1] == "-m":
            args = []
            for arg in words[i + 3 :]:
                if arg in OPERATORS:
                    break
                args.append(arg)
            found.append((words[i + 2], args))
    return found


# --- make ----------------------------------------------------------------------------------------------


MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
MAKE_VARIABLES = set(re.findall(r"\$\((\w+)\)", MAKEFILE)) | set(re.findall(r"^(\w+)\s*[?:]?=", MAKEFILE, re.M))


@functools.cache
def make_dry_run(argv: tuple[str, ...]) -> str:
    result = subprocess.run(["make", "-n", "--no-print-directory", *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"make -n {shlex.join(argv)}: {result.stderr.strip()}"
    return result.stdout


def check_make(argv: list[str], synopsis: bool) -> set[str]:
    """-> the project modules the command runs."""
    assigned = [a.split("=", 1)[0] for a in argv[1:] if "=" in a]
    unknown = [v for v in assigned if v not in MAKE_VARIABLES]
    assert not unknown, f"the Makefile reads no {', '.join(unknown)}"
    modules = set()
    for line in make_dry_run(tuple(argv[1:])).replace("\\\n", " ").splitlines():  # a recipe line ending in \\ goes on
        for name, args in module_invocations(line):
            check_module_command(name, args, synopsis)
            modules.add(name)
    return modules


# --- GPU-only commands -------------------------------------------------------------------------------


def _launcher():
    from launcher import server

    return server


@functools.cache
def tritonserver_options() -> dict:
    launcher = _launcher()
    wheel = launcher.wheel() if hasattr(launcher, "wheel") else launcher.WHEEL
    env = launcher.TritonServer(Path("unused")).environment()
    result = subprocess.run([str(wheel / "bin" / "tritonserver"), "--help"], env=env, capture_output=True, text=True)
    return {flag: None for flag in re.findall(r"--[a-z][a-z0-9-]*", result.stdout + result.stderr)}


def check_mpirun(argv: list[str]) -> None:
    from launcher.gpu import server_command

    real = server_command(Path("OUT"), 2, 8000, 8001, 8002)
    names = {word.split("=")[0] for word in real if word.startswith("-")}
    for word in argv[1:]:
        if not word.startswith("-"):
            continue
        if "X" in word:
            assert word.split("=")[0] in names, f"launcher.gpu's mpirun command has no {word.split('=')[0]}"
        else:
            assert word in real, f"launcher.gpu's mpirun command has no {word} ({shlex.join(real)})"


def modules_of(command: DocCommand) -> set[str]:
    words = command.words
    if words[0] == "make":
        return check_make(synopsis_argv(command.text), True)
    if words[0] in PYTHONS and len(words) > 2 and words[1] == "-m":
        return {words[2]}
    ref = module_ref(words[0])
    return {ref} if ref else set()

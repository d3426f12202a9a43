"""The README and the manual in docs/ still match the code.

* README.md stays a front page: at most 200 lines.
* Every ``python -m MODULE ...`` command of pneumo shown in a ```bash block of README.md or
  docs/*.md runs with the flags it shows plus ``--helpfull``. absl answers ``--helpfull`` by
  printing the flag list to stdout and exiting with status 1 (``absl.app.HelpfullFlag``) before
  the job's ``main`` runs; a flag value absl checks (an enum, a number) fails with "FATAL Flags
  parsing error" first. absl does not report an *unknown* flag once ``--helpfull`` has been
  seen, so each flag shown is also looked up in the printed list: a renamed flag or module
  breaks the build, not the reader. Commands are grouped per module (one process each, the
  flags of all its commands together); a failing group is re-run command by command to name
  the culprit. Job modules import no TensorFlow before their flags are parsed, so each process
  takes about a second.
* Every ```python block compiles, its imports run, and the attributes, calls and keyword
  arguments it uses on pneumo's own modules and classes exist (nothing is trained or read).
* Relative links between the Markdown files point at files and headings that exist.
"""

from __future__ import annotations

import ast
import concurrent.futures
import inspect
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("pneumo_data", "pneumo_models", "pneumo_eval", "benchmarks")
README_MAX_LINES = 200
FLAG_ERRORS = ("Unknown command line flag", "FATAL Flags parsing error", "Traceback",
               "No module named", "Error while finding module")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """``(first line number, text)`` of each fenced block of ``language`` in ``path``."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if current is None:
            if fence == "```" + language:
                current, start = [], number + 1
        elif fence.startswith("```"):
            blocks.append((start, "\n".join(current)))
            current = None
        else:
            current.append(line)
    assert current is None, f"{_rel(path)}:{start}: unclosed ```{language} block"
    return blocks


# ------------------------------------------------------------------ commands in ```bash blocks

def _logical_lines(text: str, first_line: int):
    """Shell lines with backslash continuations joined: ``(line number, line)``."""
    pending, start = "", first_line
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _tokens(line: str) -> list[str]:
    # Command substitutions are values here (--worker_host=$(hostname)); keep them one word.
    line = re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def documented_commands() -> list[dict]:
    """Every pneumo ``python -m`` command in a ```bash block: where, module and arguments."""
    commands = []
    for path in PAGES:
        for first, text in fenced_blocks(path, "bash"):
            for number, line in _logical_lines(text, first):
                tokens, segment = _tokens(line), []
                for token in [*tokens, ";"]:
                    if token not in SHELL_OPERATORS:
                        segment.append(token)
                        continue
                    for i in range(len(segment) - 2):
                        if (segment[i] in ("python", "python3") and segment[i + 1] == "-m"
                                and segment[i + 2].split(".")[0] in PACKAGES):
                            commands.append({"where": f"{_rel(path)}:{number}",
                                             "module": segment[i + 2],
                                             "args": segment[i + 3:], "line": line.strip()})
                            break
                    segment = []
    return commands


COMMANDS = documented_commands()
MODULES = sorted({c["module"] for c in COMMANDS})


def _flag_name(arg: str) -> str | None:
    """``--name=value`` / ``--name`` / ``-v=1`` -> the flag name; None for anything else."""
    match = re.fullmatch(r"--?([A-Za-z][\w]*)(=.*)?", arg, re.S)
    return match.group(1) if match else None


def _help_flags(stdout: str) -> tuple[set[str], set[str]]:
    """(every flag name, the boolean ones) of an absl --helpfull listing."""
    names, booleans = set(), set()
    for short, negatable, name in re.findall(r"^\s+(-\w,)?--(\[no\])?(\w+):", stdout, re.M):
        names.add(name)
        if short:
            names.add(short[1:-1])
        if negatable:
            booleans.add(name)
    return names, booleans


def _run_helpfull(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # --flagfile would be read while parsing: its name is checked against the listing instead.
    args = [a for a in args if _flag_name(a) != "flagfile"]
    return subprocess.run([sys.executable, "-m", module, *args, "--helpfull"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def _problems(command: dict, result: subprocess.CompletedProcess) -> list[str]:
    where = f"{command['where']}: {command['line']}"
    problems = []
    if result.returncode != 1:
        problems.append(f"exit status {result.returncode}, absl exits 1 after --helpfull")
    for marker in FLAG_ERRORS:
        if marker in result.stderr or marker in result.stdout:
            problems.append(f"{marker!r}: {result.stderr.strip()[-600:]}")
    names, booleans = _help_flags(result.stdout)
    if not names:
        problems.append("no flag listing printed")
    for arg in command["args"] if names else ():
        name = _flag_name(arg)
        if name is None:
            problems.append(f"{arg!r} is not a --flag=value (write flags as --name=value)")
        elif name not in names and not (name.startswith("no") and name[2:] in booleans):
            problems.append(f"--{name} is not a flag of {command['module']}")
        elif "=" not in arg and name not in booleans and not (
                name.startswith("no") and name[2:] in booleans):
            problems.append(f"{arg!r} has no value (write --{name}=value)")
    return [f"{where}\n    {p}" for p in problems]


@pytest.fixture(scope="module")
def helpfull_runs() -> dict[str, subprocess.CompletedProcess]:
    """One ``--helpfull`` process per module with the flags of all its documented commands."""
    def run(module):
        args = [a for c in COMMANDS if c["module"] == module for a in c["args"]]
        return module, _run_helpfull(module, args)
    workers = min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(run, MODULES))


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_docs_show_every_job():
    shown = set(MODULES)
    for job in ("pneumo_data.prepare", "pneumo_models.train", "pneumo_eval.evaluate",
                "pneumo_eval.predict", "pneumo_models.export", "pneumo_eval.robustness",
                "pneumo_data.visualize", "pneumo_data.service"):
        assert job in shown, f"no ```bash block of the docs runs python -m {job}"


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_documented_commands_parse(module, helpfull_runs):
    commands = [c for c in COMMANDS if c["module"] == module]
    merged = {"where": ", ".join(c["where"] for c in commands), "module": module,
              "args": [a for c in commands for a in c["args"]],
              "line": f"(the {len(commands)} documented commands of {module})"}
    if not _problems(merged, helpfull_runs[module]):
        return
    problems = [p for c in commands for p in _problems(c, _run_helpfull(module, c["args"]))]
    assert not problems, "documented commands that no longer parse:\n" + "\n".join(problems)


# ------------------------------------------------------------------ examples in ```python blocks

PYTHON_BLOCKS = [(path, first, text) for path in PAGES
                 for first, text in fenced_blocks(path, "python")]


def _ours(obj) -> bool:
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", "")
    return isinstance(name, str) and name.split(".")[0] in PACKAGES


def _imports(tree: ast.Module, where: str) -> dict:
    """Runs the block's import statements (only those); returns the names they bind."""
    namespace: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            code = compile(ast.Module(body=[node], type_ignores=[]), where, "exec")
            try:
                exec(code, namespace)  # the docs' own import lines, nothing else
            except ImportError as error:
                raise AssertionError(f"{where}:{node.lineno}: {ast.unparse(node)}: "
                                     f"{error}") from None
    namespace.pop("__builtins__", None)
    return namespace


class _Checker(ast.NodeVisitor):
    """Attributes, calls and keyword arguments on pneumo's modules and classes."""

    def __init__(self, namespace: dict, tree: ast.Module, where: str):
        stored = [n.id for n in ast.walk(tree)
                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        self.objects = {k: v for k, v in namespace.items() if k not in stored}
        self.instances: dict[str, type] = {}
        for node in ast.walk(tree):  # name = OurClass(...), assigned once: an instance of it
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            if (isinstance(target, ast.Name) and len(node.targets) == 1
                    and stored.count(target.id) == 1):
                kind = self.resolve(node.value, report=False)
                if kind and kind[0] == "instance":
                    self.instances[target.id] = kind[1]
        self.where, self.errors = where, []

    def resolve(self, node, report=True):
        """("object", obj) or ("instance", cls) for an expression on our names, else None."""
        if isinstance(node, ast.Name):
            if node.id in self.objects and _ours(self.objects[node.id]):
                return "object", self.objects[node.id]
            if node.id in self.instances:
                return "instance", self.instances[node.id]
            return None
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value, report)
            if base is None:
                return None
            kind, obj = base
            if not hasattr(obj, node.attr):
                if report and kind == "object":
                    self.errors.append(f"{self.where}:{node.lineno}: {ast.unparse(node)}: "
                                       f"{getattr(obj, '__name__', obj)} has no {node.attr!r}")
                return None
            value = getattr(obj, node.attr)
            if kind == "instance":
                return ("method", value) if callable(value) else None
            return ("object", value) if _ours(value) else None
        if isinstance(node, ast.Call):
            target = self.resolve(node.func, report)
            if target and target[0] == "object" and inspect.isclass(target[1]):
                return "instance", target[1]
        return None

    def visit_Attribute(self, node):
        if isinstance(node.ctx, ast.Load):
            self.resolve(node)
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute):  # a method called on one of our instances
            base = self.resolve(node.func.value, report=False)
            if base and base[0] == "instance" and not hasattr(base[1], node.func.attr):
                self.errors.append(f"{self.where}:{node.lineno}: {ast.unparse(node.func)}: "
                                   f"{base[1].__name__} has no method {node.func.attr!r}")
        target = self.resolve(node.func)
        if target and callable(target[1]) and not any(
                isinstance(a, ast.Starred) for a in node.args) and all(
                k.arg is not None for k in node.keywords):
            try:
                signature = inspect.signature(target[1])
            except (TypeError, ValueError):
                signature = None
            if signature is not None:
                args = [None] * (len(node.args) + (target[0] == "method"))
                try:
                    signature.bind(*args, **{k.arg: None for k in node.keywords})
                except TypeError as error:
                    self.errors.append(f"{self.where}:{node.lineno}: {ast.unparse(node.func)}"
                                       f"(...): {error}")
        self.generic_visit(node)


@pytest.mark.parametrize("path,first,text", PYTHON_BLOCKS,
                         ids=[f"{_rel(p)}:{n}" for p, n, _ in PYTHON_BLOCKS])
def test_python_examples_match_the_code(path, first, text):
    # Line numbers in messages are the page's: pad the block down to where it starts.
    tree = ast.parse("\n" * (first - 1) + text, filename=_rel(path))
    compile(tree, _rel(path), "exec")
    namespace = _imports(tree, _rel(path))
    checker = _Checker(namespace, tree, _rel(path))
    checker.visit(tree)
    errors = list(dict.fromkeys(checker.errors))
    assert not errors, "\n".join(errors)


# ------------------------------------------------------------------ links between the pages

def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.*)", line)):
            text = match.group(1).strip().lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_relative_links_resolve():
    problems = []
    for path in PAGES:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{_rel(path)}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{_rel(path)}: {target}: no such heading")
    assert not problems, "\n".join(problems)

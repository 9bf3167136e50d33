"""Every command the README and docs/ show works as written, run as a new user would: a shell, the installed
`bntool`, the example checkpoints, in a folder of its own.

How a fenced block is read (docs/development.md says the same to whoever writes the docs):

- ```` ```bash ````: each line is a command (``#`` lines are comments); each must exit 0.
- ```` ```console ````: ``$ `` lines are commands, the lines after one are what it prints. A command must exit
  0, unless what it prints starts with ``Error:``: then it must exit 2 and print exactly that on stderr (the
  shown text may be wrapped).
- ```` ```python ````: run; each block whole, on its own (a reader can paste one alone).
- ```` ```bash long ````: commands that take minutes (set-up, the whole suite, benchmarks), checked without
  running them: the program is there, and every option given to it is one its ``--help`` lists.
- ```` ```text ````: shown, not run (output, messages, another project's paths).

Any other fence fails the test, so no block is left out unseen. A page's shell blocks run first, in order, then
its Python blocks, all in one folder: a copy of ``examples/``, where the README makes its own checkpoints (its
quick start does) and each page of docs/ starts from those ``examples/make_checkpoints.py`` writes.

Each command is a process of its own, with the page's folder and the same environment. A plain ``bntool ARGS``
(no shell syntax), the Python blocks and the ``--help`` of a long command run in a process forked from one that
has imported bntool, torch and the exporters already (``tests/_fork_server.py``: the console script's code,
``sys.exit(bntool.cli.main())``, or the interpreter's ``-c`` / ``-m`` / script); the README's first ``bntool``
command, and every other command, run through ``bash`` and the installed console script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import python_env, run, stop

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
KINDS = {"bash": "run", "console": "run", "python": "run", "bash long": "long", "text": "shown"}
FENCE = re.compile(r"^```([^`\n]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

# Each Python block in a fresh namespace, compiled under the page's name and line numbers (tracebacks point there).
PYTHON_DRIVER = """
import json, sys
for page, line, source in json.load(open(sys.argv[1])):
    exec(compile("\\n" * (line - 1) + source, page, "exec"), {"__name__": "__main__"})
"""


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the block's first line
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    text = path.read_text()
    page = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return [Block(page, text.count("\n", 0, m.start(2)) + 1, m.group(1).strip(), m.group(2))
            for m in FENCE.finditer(text)]


def commands(block: Block) -> list[tuple[str, str]]:
    """``(command, what it is shown printing)`` for each command of a bash or console block."""
    if block.info == "console":
        found: list[tuple[str, list[str]]] = []
        for line in block.text.splitlines():
            if line.startswith("$ "):
                found.append((line[2:], []))
            elif found:
                found[-1][1].append(line)
        return [(cmd, "\n".join(shown).strip()) for cmd, shown in found]
    return [(line, "") for line in block.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _env() -> dict[str, str]:
    """This tree's bntool (PYTHONPATH), the console scripts of this interpreter first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return python_env(PATH=path)


class Forks:
    """Processes forked from servers (``tests/_fork_server.py``) that have imported bntool and torch once; one
    server per thread that asks at the same time. ``run`` answers as ``conftest.run`` does."""

    def __init__(self) -> None:
        self.idle: queue.SimpleQueue[subprocess.Popen] = queue.SimpleQueue()
        self.started: list[subprocess.Popen] = []
        self.folder = Path(tempfile.mkdtemp(prefix="bntool-forks-"))
        # (where the console script is, or would be: a forked command only takes its name and folder)
        self.script = str(Path(sys.executable).parent / "bntool")

    def _server(self) -> subprocess.Popen:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            server = subprocess.Popen([sys.executable, "-c", (ROOT / "tests" / "_fork_server.py").read_text()],
                                      env=_env(), cwd=self.folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
            self.started.append(server)
            return server

    def run(self, kind: str, argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """``kind`` "bntool": the console script with ``argv``; "python": the interpreter with ``argv``."""
        server = self._server()
        out, err = (Path(tempfile.mkstemp(dir=self.folder, suffix=name)[1]) for name in (".out", ".err"))
        request = {"kind": kind, "argv": argv, "cwd": str(cwd), "script": self.script, "stdout": str(out),
                   "stderr": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        if not select.select([server.stdout], [], [], timeout)[0]:
            stop(server)
            pytest.fail(f"`{kind} {shlex.join(argv)}` did not finish within {timeout} s")
        answer = server.stdout.readline()
        if not answer:
            stop(server)
            pytest.fail(f"the fork server died running `{kind} {shlex.join(argv)}`:\n{server.stderr.read()}")
        self.idle.put(server)
        code = json.loads(answer)["code"]
        result = subprocess.CompletedProcess([kind, *argv], code, out.read_text(), err.read_text())
        out.unlink()
        err.unlink()
        return result

    def close(self) -> None:
        for server in self.started:
            server.stdin.close()
            stop(server)
        shutil.rmtree(self.folder, ignore_errors=True)


def forkable(cmd: str) -> list[str] | None:
    """The arguments of a plain ``bntool ARGS`` (nothing a shell would expand or redirect), else None."""
    if '"' in cmd or re.search(r"[|&;<>()$`\\*?\[\]{}~#\n]", re.sub(r"'[^'\n]*'", "", cmd)):
        return None
    words = shlex.split(cmd)
    return words[1:] if words[0] == "bntool" else None


def run_page(page: list[Block], cwd: Path, forks: Forks | None = None, shell_first: int = 0) -> str:
    """Run a page's blocks in ``cwd``: shell commands in order, then the Python blocks; stdout of it all. With
    ``forks``, plain ``bntool`` commands but the first ``shell_first`` ones, and the Python blocks, run forked."""
    output = []
    for block in [b for b in page if KINDS.get(b.info) == "run" and b.info != "python"]:
        for cmd, shown in commands(block):
            argv = forkable(cmd) if forks is not None else None
            if argv is not None and shell_first > 0:
                shell_first, argv = shell_first - 1, None
            if argv is not None:
                result = forks.run("bntool", argv, cwd)
            else:
                result = run(["bash", "-c", cmd], cwd=cwd, env=_env(), timeout=600)
            said = f"{block.where}: `{cmd}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            if shown.startswith("Error:"):
                assert result.returncode == 2, said
                assert " ".join(result.stderr.split()) == " ".join(shown.split()), said
            else:
                assert result.returncode == 0, said
            output.append(result.stdout)
    python = [(b.page, b.line, b.text) for b in page if b.info == "python"]
    if python:
        listing = cwd / ".python-blocks.json"
        listing.write_text(json.dumps(python))
        argv = ["-c", PYTHON_DRIVER, str(listing)]
        if forks is not None:
            result = forks.run("python", argv, cwd)
        else:
            result = run([sys.executable, *argv], cwd=cwd, env=_env(), timeout=600)
        assert result.returncode == 0, f"a Python block of {page[0].page} failed:\n{result.stderr}"
        output.append(result.stdout)
    return "\n".join(output)


def _copy_examples(dest: Path, out: Path | None = None) -> Path:
    shutil.copytree(ROOT / "examples", dest / "examples", ignore=shutil.ignore_patterns("out", "__pycache__"))
    if out is not None:
        shutil.copytree(out, dest / "examples" / "out")
    return dest


def _need_console_script() -> None:
    if shutil.which("bntool", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the bntool console script is not installed in this environment")


RUNNABLE_PAGES = [p for p in PAGES if any(KINDS.get(b.info) == "run" for b in blocks(p))]


@pytest.fixture(scope="module")
def forks():
    forks = Forks()
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, forks) -> Path:
    """``examples/out`` as ``python examples/make_checkpoints.py`` writes it, once for every page."""
    work = _copy_examples(tmp_path_factory.mktemp("checkpoints"))
    result = forks.run("python", ["examples/make_checkpoints.py", "--out-dir", "examples/out"], work)
    assert result.returncode == 0, result.stderr
    return work / "examples" / "out"


def test_every_block_is_run_checked_or_shown():
    for path in [README, *PAGES]:
        for block in blocks(path):
            assert block.info in KINDS, (
                f"{block.where}: a ```{block.info} block; use ```bash, ```console or ```python for what runs, "
                "```bash long for commands too long to run in the tests, ```text for what is only shown")


def test_set_up_is_two_commands_and_ci_runs_them():
    section = README.read_text().split("## Set-up", 1)[1]
    setup = next(b for b in blocks(README) if b.info == "bash long" and b.text.strip() in section)
    lines = [cmd for cmd, _ in commands(setup)]
    assert lines == ['python -m pip install "torch==2.13.0" -e ".[test]"', "python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(line in ci for line in lines), "`.ci/run` must run the README's set-up exactly as written"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", path.read_text())
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", text, re.MULTILINE)}


def test_links_lead_somewhere():
    for path in [README, *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.relative_to(ROOT)} links to {target}, which is not there"
            if anchor:
                assert anchor in _anchors(dest), f"{path.relative_to(ROOT)} links to {target}: no such heading"


@pytest.mark.slow
def test_readme_runs_as_written(page_runs):
    failure, out, work = page_runs[README]
    if failure is not None:
        raise failure
    assert (work / "examples" / "out" / "lenet.folded.safetensors").exists()
    assert (work / "examples" / "out" / "lenet.deploy.safetensors").exists()
    # The quick start's output, as shown, is what it prints: the folds, the file written, the model loaded back.
    shown = [b.text for b in blocks(README) if b.info == "text"]
    fold_shown, load_shown = shown[0], shown[1]
    folds = fold_shown.split("Verification:")[0].splitlines()
    assert folds[0] == "Folded 4 BatchNorm layer(s)"
    for line in [*folds, fold_shown.splitlines()[-1], *load_shown.splitlines()]:
        assert line in out, f"the README shows {line!r}, which the quick start no longer prints"


@pytest.fixture(scope="module")
def page_runs(checkpoints, forks, tmp_path_factory) -> dict[Path, tuple[AssertionError | None, str, Path]]:
    """The README (in a folder with no checkpoints: its quick start makes them) and every runnable page of docs/
    (with the examples' checkpoints), each in a folder of its own, two at a time (the commands are processes that
    mostly wait on their own start-up, or on a child forked for it): what each run raised (or None), what it
    printed, and its folder."""
    _need_console_script()
    folders = {README: _copy_examples(tmp_path_factory.mktemp("readme"))}
    folders.update({page: _copy_examples(tmp_path_factory.mktemp(page.stem), checkpoints) for page in RUNNABLE_PAGES})

    def one(page: Path) -> tuple[AssertionError | None, str, Path]:
        try:
            return None, run_page(blocks(page), folders[page], forks, shell_first=page == README), folders[page]
        except AssertionError as failure:
            return failure, "", folders[page]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(folders, pool.map(one, folders)))


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_runs_as_written(page, page_runs):
    failure = page_runs[page][0]
    if failure is not None:
        raise failure


@pytest.mark.slow
def test_long_commands_name_real_programs_and_options(forks):
    helps: dict[tuple[str, ...], str] = {}
    for path in [README, *PAGES]:
        for block in [b for b in blocks(path) if b.info == "bash long"]:
            for cmd, _ in commands(block):
                words = shlex.split(cmd, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                    words.pop(0)
                assert words[0] == "python", f"{block.where}: `{cmd}`: only `python ...` commands are checked"
                program = tuple(words[1:3]) if words[1] == "-m" else (words[1],)
                if program[0] == "-m" and len(words) > 3 and not words[3].startswith("-"):
                    program = (*program, words[3])  # a subcommand: `python -m pip install`
                if program[0] != "-m":
                    assert (ROOT / program[0]).is_file(), f"{block.where}: `{cmd}`: no file {program[0]}"
                if program not in helps:
                    result = forks.run("python", [*program, "--help"], ROOT)
                    assert result.returncode == 0, f"{block.where}: `{cmd}`: --help failed:\n{result.stderr}"
                    helps[program] = result.stdout
                for word in words[1 + len(program):]:
                    option = word.split("=")[0]
                    if option.startswith("-"):
                        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[program]), (
                            f"{block.where}: `{cmd}`: {' '.join(program)} has no option {option}")


def test_the_runner_fails_on_a_broken_command(tmp_path, forks):
    """What the tests above catch: a command that fails, an error that is not the one shown, a Python block
    that raises, a fence the runner would not know; through the shell, and forked (``bntool`` commands too)."""
    missing = "Error: the checkpoint `missing.pt` does not exist; pass an existing file"
    cases = {
        "```bash\ntrue\nfalse\n```\n": "`false` exited 1",
        "```console\n$ echo 'Error: something' >&2; exit 2\nError: something else\n```\n": "exited 2",
        "```console\n$ echo fine\nError: shown but not printed\n```\n": "exited 0",
        "```python\nx = 1\n```\n\n```python\nprint(x)\n```\n": "NameError",  # each block whole, on its own
        "```python\nimport sys\nsys.exit(3)\n```\n": "failed",
        "```bash\nbntool fold --no-such-option\n```\n": "exited 2",
        "```console\n$ bntool inspect missing.pt\nError: something else\n```\n": "exited 2",
        "```console\n$ bntool --help\nError: shown but not printed\n```\n": "exited 0",
    }
    for runner in (None, forks):
        for i, (text, said) in enumerate(list(cases.items())[: 4 if runner is None else None]):
            page = tmp_path / f"page{i}.md"
            page.write_text(text)
            with pytest.raises(AssertionError, match=re.escape(said)):
                run_page(blocks(page, tmp_path), tmp_path, runner)
    # what passes: the error exactly as shown (exit 2, on stderr), and what a command prints comes back
    page.write_text(f"```console\n$ bntool inspect missing.pt\n{missing}\n$ bntool --help\n```\n\n"
                    "```python\nimport sys\nprint(sys.argv[0], 'from a block')\n```\n")
    out = run_page(blocks(page, tmp_path), tmp_path, forks)
    assert "Usage: bntool" in out and "recalibrate" in out and "-c from a block" in out
    page = tmp_path / "unknown.md"
    page.write_text("```sh\nls\n```\n")
    assert [b.info for b in blocks(page, tmp_path)] == ["sh"] and "sh" not in KINDS


def test_only_a_plain_bntool_command_runs_forked():
    assert forkable("bntool fold a.pth --model m.py:net --include 'layer1.*' --out b.st") == [
        "fold", "a.pth", "--model", "m.py:net", "--include", "layer1.*", "--out", "b.st"]
    for cmd in ["bntool fold a.pth | head", "bntool fold a.pth > log", "bntool fold *.pth", 'bntool fold "$X"',
                "bntool fold a.pth && ls", "X=1 bntool fold a.pth", "python -m bntool fold a.pth", "bntool fold ~/a"]:
        assert forkable(cmd) is None, cmd

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
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import python_env, run

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


def run_page(page: list[Block], cwd: Path) -> str:
    """Run a page's blocks in ``cwd``: shell commands in order, then the Python blocks; stdout of it all."""
    output = []
    for block in [b for b in page if KINDS.get(b.info) == "run" and b.info != "python"]:
        for cmd, shown in commands(block):
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
        result = run([sys.executable, "-c", PYTHON_DRIVER, str(listing)], cwd=cwd, env=_env(), timeout=600)
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
def checkpoints(tmp_path_factory) -> Path:
    """``examples/out`` as ``python examples/make_checkpoints.py`` writes it, once for every page."""
    work = _copy_examples(tmp_path_factory.mktemp("checkpoints"))
    result = run([sys.executable, "examples/make_checkpoints.py", "--out-dir", "examples/out"], cwd=work,
                 env=_env())
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
def page_runs(checkpoints, tmp_path_factory) -> dict[Path, tuple[AssertionError | None, str, Path]]:
    """The README (in a folder with no checkpoints: its quick start makes them) and every runnable page of docs/
    (with the examples' checkpoints), each in a folder of its own, two at a time (the commands are processes that
    mostly wait on their own start-up): what each run raised (or None), what it printed, and its folder."""
    _need_console_script()
    folders = {README: _copy_examples(tmp_path_factory.mktemp("readme"))}
    folders.update({page: _copy_examples(tmp_path_factory.mktemp(page.stem), checkpoints) for page in RUNNABLE_PAGES})

    def one(page: Path) -> tuple[AssertionError | None, str, Path]:
        try:
            return None, run_page(blocks(page), folders[page]), folders[page]
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
def test_long_commands_name_real_programs_and_options():
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
                    result = run([sys.executable, *program, "--help"], cwd=ROOT, env=_env())
                    assert result.returncode == 0, f"{block.where}: `{cmd}`: --help failed:\n{result.stderr}"
                    helps[program] = result.stdout
                for word in words[1 + len(program):]:
                    option = word.split("=")[0]
                    if option.startswith("-"):
                        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[program]), (
                            f"{block.where}: `{cmd}`: {' '.join(program)} has no option {option}")


def test_the_runner_fails_on_a_broken_command(tmp_path):
    """What the tests above catch: a command that fails, an error that is not the one shown, a Python block
    that raises, a fence the runner would not know."""
    cases = {
        "```bash\ntrue\nfalse\n```\n": "`false` exited 1",
        "```console\n$ echo 'Error: something' >&2; exit 2\nError: something else\n```\n": "exited 2",
        "```console\n$ echo fine\nError: shown but not printed\n```\n": "exited 0",
        "```python\nx = 1\n```\n\n```python\nprint(x)\n```\n": "NameError",  # each block whole, on its own
    }
    for i, (text, said) in enumerate(cases.items()):
        page = tmp_path / f"page{i}.md"
        page.write_text(text)
        with pytest.raises(AssertionError, match=re.escape(said)):
            run_page(blocks(page, tmp_path), tmp_path)
    page = tmp_path / "unknown.md"
    page.write_text("```sh\nls\n```\n")
    assert [b.info for b in blocks(page, tmp_path)] == ["sh"] and "sh" not in KINDS

"""The documents a user pastes from: every shell block in README.md, docs/ and benchmarks/ parses
as bash and continues its lines the way it means to, every Python block of README.md and docs/
compiles as a script, and every relative link leads to a file of the repository (and every #anchor
to a heading of that file).

The shell and Python blocks of README.md and docs/ are also run, against a real server, by
tests/test_documentation_runs.py. A block that cannot run there (a server that runs until
stopped, Docker, a cluster, a GPU, a measurement of minutes) says so on the line above its fence,
naming the check that exercises it instead and why:

    <!-- not run: checked by make deploy-check; needs Docker and a Kubernetes cluster -->

and this file checks that the named check exists (a Makefile target, a test file or a test in it).

Pure and fast: it reads Markdown, runs ``bash -n`` and compiles Python; no server, no model. Each
failure names the document and the line, so the fix starts at the right place.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PYTHON_LANGUAGES = {"python", "py"}
# The marker of a block that is not run, on the line above its fence (module docstring).
_NOT_RUN = re.compile(
    r"^\s*<!--\s*not run: checked by (?P<check>make [\w.-]+|tests/[\w/.-]+\.py(?:::\w+)?)\s*;\s*(?P<reason>[^<>]*?\S)\s*-->\s*$"
)
_MARKER_START = re.compile(r"^\s*<!--\s*not run")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
# `\` then blanks (and maybe a comment) at the end of a line: the backslash escapes a blank, not the
# newline, so the next line runs as a command of its own (`--adapter: command not found`).
_BROKEN_CONTINUATION = re.compile(r"(?<!\\)\\[ \t]+(#.*)?$")
# An option where a command should start: its line was meant to continue the one before.
_STRAY_OPTION = re.compile(r"^\s*--?[A-Za-z]")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>\w+)\1")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class CodeBlock:
    document: Path
    line: int  # 1-based line of the block's first content line
    language: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.document.relative_to(PROJECT_ROOT)}:{self.line + offset}"


def documents() -> list[Path]:
    found = [PROJECT_ROOT / "README.md"]
    for folder in ("docs", "benchmarks"):
        found += sorted((PROJECT_ROOT / folder).glob("**/*.md"))
    return [path for path in found if path.is_file()]


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Lines outside fenced blocks as (line number, text), and each block as (first line, info, text)."""
    prose, blocks = [], []
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            prose.append((index + 1, lines[index]))
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body, index = [], index + 1
        start = index + 1
        while index < len(lines) and not closing.match(lines[index]):
            line = lines[index]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())  # a fence's indent, not the code's
            index += 1
        blocks.append((start, opening["info"].lower(), "\n".join(body)))
        index += 1  # the closing fence
    return prose, blocks


def shell_blocks(document: Path) -> list[CodeBlock]:
    _, blocks = split_markdown(document.read_text(encoding="utf-8"))
    return [CodeBlock(document, line, info, text) for line, info, text in blocks if info in SHELL_LANGUAGES]


@dataclass(frozen=True)
class NotRun:
    """A block's "not run" marker."""

    line: int  # 1-based, in its document
    check: str  # `make TARGET`, or tests/FILE.py[::TEST]
    reason: str


def runnable_blocks(document: Path, text: str | None = None) -> list[tuple[CodeBlock, NotRun | None]]:
    """Each shell and Python block, in order, with its "not run" marker (None: it is run)."""
    text = document.read_text(encoding="utf-8") if text is None else text
    lines = text.split("\n")
    found = []
    for line, info, body in split_markdown(text)[1]:
        if info not in SHELL_LANGUAGES | PYTHON_LANGUAGES:
            continue
        above = line - 3  # index of the line above the fence (``line`` is the 1-based first line inside it)
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = _NOT_RUN.match(lines[above]) if above >= 0 else None
        not_run = NotRun(above + 1, marker["check"], marker["reason"]) if marker else None
        found.append((CodeBlock(document, line, info, body), not_run))
    return found


def run_documents() -> list[Path]:
    """The documents whose blocks are run: the README and docs/ (benchmarks/ holds records of runs)."""
    return [path for path in DOCUMENTS if path.name == "README.md" and path.parent == PROJECT_ROOT or "docs" in path.parts]


def marker_problems(document: Path, text: str | None = None) -> list[str]:
    """Markers that name no existing check, and marker-like lines that are not markers of a block."""
    text = document.read_text(encoding="utf-8") if text is None else text
    problems = []
    marked_lines = set()
    here = document.relative_to(PROJECT_ROOT)
    for _, marker in runnable_blocks(document, text):
        if marker is None:
            continue
        marked_lines.add(marker.line)
        check = marker.check
        if check.startswith("make "):
            target = check.removeprefix("make ")
            if not re.search(rf"^{re.escape(target)}:", (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE):
                problems.append(f"{here}:{marker.line}: checked by {check}, but the Makefile has no target {target}")
            continue
        path, _, test = check.partition("::")
        if not (PROJECT_ROOT / path).is_file():
            problems.append(f"{here}:{marker.line}: checked by {check}, but there is no {path}")
        elif test and not re.search(rf"^(async )?def {test}\(", (PROJECT_ROOT / path).read_text(encoding="utf-8"), re.MULTILINE):
            problems.append(f"{here}:{marker.line}: checked by {check}, but {path} has no test {test}")
    prose, _ = split_markdown(text)
    for number, line in prose:
        if _MARKER_START.match(line) and number not in marked_lines:
            problems.append(f"{here}:{number}: a "
                            "`<!-- not run: checked by CHECK; REASON -->` marker must stand right above a shell or Python block, "
                            f"name a make target or tests/ file and give its reason: {line.strip()!r}")
    return problems


def console_commands(text: str) -> str:
    """The commands of a console transcript: `$ ` lines and their continuations; output lines blank."""
    kept, continuing = [], False
    for line in text.split("\n"):
        stripped = line.lstrip()
        if continuing or stripped.startswith("$ "):
            command = line if continuing else stripped[2:]
            kept.append(command)
            continuing = command.endswith("\\")
        else:
            kept.append("")
    return "\n".join(kept)


def shell_problems(block: CodeBlock) -> list[str]:
    script = console_commands(block.text) if block.language == "console" else block.text
    problems = []
    previous, heredoc_end = "", None
    for offset, line in enumerate(script.split("\n")):
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        if _BROKEN_CONTINUATION.search(line):
            problems.append(f"{block.where(offset)}: `\\` followed by blanks or a comment continues nothing: {line.strip()!r}")
        elif _STRAY_OPTION.match(line) and not previous.rstrip().endswith(("\\", "|", "&&", "||")):
            problems.append(f"{block.where(offset)}: an option starts a command (the line above lacks its `\\`): {line.strip()!r}")
        heredoc = _HEREDOC.search(line)
        if heredoc:
            heredoc_end = heredoc["word"]
        if line.strip():
            previous = line
    parsed = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    if parsed.returncode != 0:
        for message in parsed.stderr.strip().splitlines():
            at = re.search(r"line (\d+):", message)
            where = block.where(int(at[1]) - 1) if at else block.where()
            problems.append(f"{where}: bash -n: {message}")
    return problems


@functools.cache  # one `git ls-files` for every document checked
def repository_files() -> set[str] | None:
    """Files a fresh clone has (tracked, or new and not ignored), relative to the root; None without git."""
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        return None
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=60,
    )
    return {name for name in listed.stdout.split("\0") if name and (PROJECT_ROOT / name).exists()}


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: rendered text, lower case, punctuation dropped, blanks to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(document: Path, text: str | None = None) -> set[str]:
    prose, _ = split_markdown(document.read_text(encoding="utf-8") if text is None else text)
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose:
        heading = _HEADING.match(line)
        if heading:
            anchor = github_anchor(heading["text"])
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(document: Path, text: str | None = None) -> list[tuple[int, str]]:
    prose, _ = split_markdown(document.read_text(encoding="utf-8") if text is None else text)
    found = []
    for number, line in prose:
        line = _INLINE_CODE.sub("", line)
        found += [(number, match["target"]) for match in _INLINE_LINK.finditer(line)]
        reference = _REFERENCE_LINK.match(line)
        if reference:
            found.append((number, reference["target"]))
    return found


def link_problems(document: Path, known_files: set[str] | None, text: str | None = None) -> list[str]:
    """Problems of the links in ``document`` (or in ``text``, read as if it were that document)."""
    problems = []
    here = document.relative_to(PROJECT_ROOT)
    for number, target in links(document, text):
        if _EXTERNAL.match(target):
            continue  # http(s), mailto: nothing beyond loopback is reachable from a test
        path_part, _, anchor = target.partition("#")
        if path_part:
            resolved = (PROJECT_ROOT / path_part.lstrip("/")) if path_part.startswith("/") else (document.parent / path_part)
            resolved = resolved.resolve()
            try:
                relative = resolved.relative_to(PROJECT_ROOT).as_posix()
            except ValueError:
                problems.append(f"{here}:{number}: {target} leads outside the repository")
                continue
            in_repository = resolved.exists() and (
                known_files is None
                or relative in known_files
                or (resolved.is_dir() and any(name.startswith(relative.rstrip("/") + "/") for name in known_files))
            )
            if not in_repository:
                problems.append(f"{here}:{number}: {target}: no such file in the repository")
                continue
        else:
            resolved = document
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved, text if resolved == document else None):
            problems.append(f"{here}:{number}: {target}: {resolved.name} has no heading with the anchor #{anchor}")
    return problems


DOCUMENTS = documents()
_IDS = [str(path.relative_to(PROJECT_ROOT)) for path in DOCUMENTS]


@pytest.mark.parametrize("document", DOCUMENTS, ids=_IDS)
def test_every_shell_block_parses_and_continues_its_lines(document):
    problems = [problem for block in shell_blocks(document) for problem in shell_problems(block)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_IDS)
def test_every_relative_link_leads_to_a_file_of_the_repository(document):
    problems = link_problems(document, repository_files())
    assert not problems, "\n".join(problems)


# A page named in a comment, docstring or document: `docs/models.md`, `benchmarks/results/<date>-<topic>.md`.
_TEXT_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".md", ".txt", ""}  # "": Makefile
_NAMED_PAGE = re.compile(r"(?<![\w/.-])(?:docs|benchmarks)/[\w./-]*?\.md\b")


def test_every_page_the_code_and_documents_name_exists():
    # Comments point to the results file where a figure lives instead of quoting it; a renamed or
    # misspelt page would leave the pointer leading nowhere.
    known_files = repository_files()
    if known_files is None:
        pytest.skip("not a git checkout: the repository's files cannot be listed")
    problems = []
    for name in sorted(known_files):
        path = PROJECT_ROOT / name
        if name == "tests/test_documentation.py" or path.suffix not in _TEXT_SUFFIXES:
            continue  # this file names made-up pages on purpose, to show the checks fail
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        for number, line in enumerate(text.split("\n"), 1):
            for page in _NAMED_PAGE.findall(line):
                if page not in known_files:
                    problems.append(f"{name}:{number}: names {page}, which is not in the repository")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", run_documents(), ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_every_python_block_compiles_as_a_script(document):
    # Run as a script a reader saves: a top-level `await` or `async with` is a SyntaxError there.
    problems = []
    for block, _ in runnable_blocks(document):
        if block.language in PYTHON_LANGUAGES:
            try:
                compile(block.text, block.where(), "exec")
            except SyntaxError as error:
                problems.append(f"{block.where((error.lineno or 1) - 1)}: {error.msg}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", run_documents(), ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_a_block_that_is_not_run_names_the_check_that_exercises_it(document):
    problems = marker_problems(document)
    assert not problems, "\n".join(problems)


def test_markers_naming_no_check_or_no_reason_are_caught():
    pretend = PROJECT_ROOT / "docs" / "pretend.md"
    text = (
        "# Pretend\n\n<!-- not run: checked by make no-such-target; needs a cluster -->\n```bash\nhelm install x\n```\n\n"
        "<!-- not run: checked by tests/test_documentation.py::test_no_such_test; a reason -->\n```python\nprint(1)\n```\n\n"
        "<!-- not run: checked by make deploy-check -->\n```bash\ndocker build .\n```\n\n"
        "<!-- not run: checked by make deploy-check; kept -->\n```bash\ndocker build .\n```\n"
    )
    blocks = runnable_blocks(pretend, text)
    assert [marker is not None for _, marker in blocks] == [True, True, False, True]
    assert marker_problems(pretend, text) == [
        "docs/pretend.md:3: checked by make no-such-target, but the Makefile has no target no-such-target",
        "docs/pretend.md:8: checked by tests/test_documentation.py::test_no_such_test, but tests/test_documentation.py "
        "has no test test_no_such_test",
        "docs/pretend.md:13: a `<!-- not run: checked by CHECK; REASON -->` marker must stand right above a shell or Python "
        "block, name a make target or tests/ file and give its reason: '<!-- not run: checked by make deploy-check -->'",
    ]


def test_the_readme_and_docs_have_shell_blocks_to_check():
    # Guards the extraction itself: a fence pattern that matched nothing would pass every check above.
    readme = shell_blocks(PROJECT_ROOT / "README.md")
    assert any("make serve" in block.text for block in readme)
    assert any(shell_blocks(path) for path in DOCUMENTS if "docs" in path.parts)


def test_a_comment_after_a_continuation_is_caught_with_its_line(tmp_path):
    pasted = tmp_path / "pasted.md"
    pasted.write_text(
        "Export:\n\n```bash\npython -m export merge \\\n    --base /models/gemma-2-9b \\   # the base\n"
        "    --adapter /models/lora\n```\n",
        encoding="utf-8",
    )
    block = CodeBlock(PROJECT_ROOT / "README.md", 4, "bash", shell_blocks(pasted)[0].text)
    assert shell_problems(block) == [
        "README.md:5: `\\` followed by blanks or a comment continues nothing: '--base /models/gemma-2-9b \\\\   # the base'",
        "README.md:6: an option starts a command (the line above lacks its `\\`): '--adapter /models/lora'",
    ]


def test_bash_syntax_errors_name_the_documents_line():
    block = CodeBlock(PROJECT_ROOT / "README.md", 10, "bash", "echo one\nif true; then echo two\n")
    problems = shell_problems(block)
    assert problems and all(problem.startswith("README.md:") for problem in problems)
    assert "syntax error" in problems[0]


def test_console_blocks_check_only_the_commands():
    transcript = "$ make export \\\n    MODELS_FILE=office.yaml\nkscst-gemma2 exported (in 3 s)\n$ ls"
    assert console_commands(transcript) == "make export \\\n    MODELS_FILE=office.yaml\n\nls"


def test_links_to_missing_files_and_headings_are_caught_and_code_is_not_read_as_links():
    pretend = PROJECT_ROOT / "docs" / "pretend.md"
    text = (
        "# Pretend\n\n[ok](operations.md#tls-and-the-access-token) [up](../README.md#the-models-file) [self](#pretend)\n"
        "[gone](no-such-file.md) [heading](operations.md#no-such-heading)\n"
        "`[code](not-a-link.md)` [web](https://example.org/x.md)\n\n```bash\necho [fenced](not-a-link-either.md)\n```\n"
    )
    assert link_problems(pretend, repository_files(), text) == [
        "docs/pretend.md:4: no-such-file.md: no such file in the repository",
        "docs/pretend.md:4: operations.md#no-such-heading: operations.md has no heading with the anchor #no-such-heading",
    ]


def test_anchors_are_githubs():
    assert github_anchor("`vllm serve` on the exported folder") == "vllm-serve-on-the-exported-folder"
    assert github_anchor("Benchmark: `make bench`") == "benchmark-make-bench"
    assert github_anchor("Measuring on a lent GPU: the Gemma-2-9b recipe") == "measuring-on-a-lent-gpu-the-gemma-2-9b-recipe"

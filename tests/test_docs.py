"""The documentation keeps up with the code: every option the parser knows (with its default) in docs/cli.md, every
file of OUT in docs/out-format.md, every module in README's table, every benchmark section the code cites; README
short enough to read."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from embedder.outdir import OUT_FILES
from embedder.writer import embedding_schema
from jobs.arguments import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = (REPO / "README.md").read_text(encoding="utf-8")
README_MAX_LINES = 400
README_MAX_WIDTH = 120


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every `## ` section of a markdown text."""
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand of `imgindex` and its parser."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The optional arguments of a subcommand (not -h/--help)."""
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def option_rows(text: str, option: str) -> list[list[str]]:
    """Cells of the table rows of `text` whose first cell starts with `option` in backticks."""
    rows = []
    for line in text.splitlines():
        if re.match(rf"\| `{re.escape(option)}[ `\\]", line):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def cli_sections_for(command: str, cli: str) -> str:
    """The bodies of docs/cli.md's sections whose heading names `imgindex COMMAND`."""
    return "\n".join(body for heading, body in sections(cli) if command in re.findall(r"imgindex (\w+)", heading))


def check_cli_doc(cli: str) -> list[str]:
    """What docs/cli.md lacks: an option of a command with no table row under a heading naming that command, or a row
    whose default cell does not show the parser's default."""
    problems = []
    for command, parser in commands().items():
        text = cli_sections_for(command, cli)
        for action in options(parser):
            for option in action.option_strings:
                rows = option_rows(text, option)
                if not rows:
                    problems.append(f"imgindex {command} {option}: no row in docs/cli.md under a heading naming the command")
                    continue
                default = action.default
                if default in (None, False, [], argparse.SUPPRESS):
                    continue
                shown = [row[1].replace(",", "") for row in rows if len(row) > 1]
                if not any(str(default).replace(",", "") in cell for cell in shown):
                    problems.append(f"imgindex {command} {option}: default {default!r} not shown in docs/cli.md ({shown})")
    return problems


def test_every_parser_option_and_its_default_is_in_cli_doc():
    assert check_cli_doc((DOCS / "cli.md").read_text(encoding="utf-8")) == []


def test_the_cli_check_fails_when_an_option_row_or_a_default_is_wrong():
    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    without_row = "\n".join(line for line in cli.splitlines() if not line.startswith("| `--niter"))
    assert any("--niter" in p for p in check_cli_doc(without_row))
    wrong_default = cli.replace("| `--max-queued-requests N` | 32 |", "| `--max-queued-requests N` | 64 |")
    assert wrong_default != cli and any("--max-queued-requests" in p for p in check_cli_doc(wrong_default))
    # A command's option documented only under another command's heading does not count.
    serve_only = cli.replace("## `imgindex serve OUT [options]`", "## The search service")
    assert any(p.startswith("imgindex serve --host") for p in check_cli_doc(serve_only))


def check_out_doc(doc: str) -> list[str]:
    """What docs/out-format.md lacks: a name of OUT_FILES, or a column of the embedding shards, in backticks."""
    names = [f"OUT file {name}" for name in OUT_FILES if not re.search(rf"`{re.escape(name)}[`/]", doc)]
    columns = [f"shard column {c}" for c in embedding_schema().names if not re.search(rf"^\| `{c}` \|", doc, flags=re.M)]
    return names + columns


def test_every_out_file_and_shard_column_is_in_out_format_doc():
    assert check_out_doc((DOCS / "out-format.md").read_text(encoding="utf-8")) == []


def test_the_out_check_fails_when_a_file_is_missing():
    doc = (DOCS / "out-format.md").read_text(encoding="utf-8")
    assert check_out_doc(doc.replace("`k_sweep.csv`", "the sweep file")) == ["OUT file k_sweep.csv"]
    assert check_out_doc(doc.replace("| `mtime_ns` |", "| mtime |")) == ["shard column mtime_ns"]


def check_readme(text: str) -> list[str]:
    """README's length and width limits."""
    lines = text.splitlines()
    problems = [f"{len(lines)} lines, more than {README_MAX_LINES}"] if len(lines) > README_MAX_LINES else []
    problems += [f"line {i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > README_MAX_WIDTH]
    return problems


def test_readme_is_short_and_narrow():
    assert check_readme(README) == []


def test_the_readme_check_fails_on_a_long_readme_or_a_wide_line():
    assert check_readme(README + "\n" * (README_MAX_LINES + 1)) != []
    wide = README.rstrip("\n") + "\n" + "x" * (README_MAX_WIDTH + 1)
    assert check_readme(wide) == [f"line {len(wide.splitlines())}: {README_MAX_WIDTH + 1} characters"]


def modules() -> list[str]:
    """The project's modules, as paths relative to the repository."""
    return sorted(
        p.relative_to(REPO).as_posix()
        for package in ("embedder", "cluster", "jobs")
        for p in (REPO / package).glob("*.py")
        if p.name != "__init__.py"
    )


def test_readme_module_table_names_every_module_and_only_existing_ones():
    assert [m for m in modules() if f"`{m}`" not in README] == []
    named = re.findall(r"`((?:embedder|cluster|jobs)/\w+\.py)`", README)
    assert named and [m for m in named if not (REPO / m).is_file()] == []


def test_every_doc_the_readme_links_exists():
    links = re.findall(r"\]\((docs/[\w.-]+\.md)\)", README)
    assert {"docs/cli.md", "docs/out-format.md", "docs/http-api.md", "docs/benchmarks.md", "docs/architecture.md"} <= set(links)
    assert [link for link in links if not (REPO / link).is_file()] == []


def cited_benchmark_sections() -> dict[str, set[str]]:
    """Section names the code cites as `docs/benchmarks.md, "Name"` (or `("Name" and "Other", ...)`), by file."""
    cited: dict[str, set[str]] = {}
    for path in sorted([*REPO.glob("*/*.py"), *REPO.glob("bench/*.sh")]):
        if path.parent.name == "tests":
            continue
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"docs/benchmarks\.md([^)]*)\)", text):
            names = re.findall(r'"([^"\n]+)"', match.group(1).replace("#", " "))
            cited.setdefault(path.relative_to(REPO).as_posix(), set()).update(names)
    return cited


def test_every_benchmark_section_the_code_cites_exists():
    headings = set(re.findall(r"^#+ (.+?)\s*$", (DOCS / "benchmarks.md").read_text(encoding="utf-8"), flags=re.M))
    cited = cited_benchmark_sections()
    assert {"embedder/replicas.py", "cluster/kmeans.py", "cluster/index.py"} <= set(cited)
    missing = {f"{path}: {name}" for path, names in cited.items() for name in names if name not in headings}
    assert missing == set()


@pytest.mark.parametrize("name", ["GPU model rate", "Embedding on CPU", "Index", "k-means"])
def test_the_sections_cited_today_are_found_by_the_scan(name):
    assert any(name in names for names in cited_benchmark_sections().values())

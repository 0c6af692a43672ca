"""What the docs say a method does matches what its code declares, and every link resolves.

The tables of docs/methods.md (the methods table, "Which method runs where") and the README's
method lists are checked against conf/method/ and each method class's declared capabilities
(``supported_strategies``, ``trains_lora``): adding a method without its rows, or changing what
it supports without the table, fails here.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import METHOD_NAMES, ROOT, method_class

FAMILIES = {
    "single": "single_device",
    "single device": "single_device",
    "DDP": "ddp",
    "FSDP": "fsdp",
    "FSDP (FSDP2)": "fsdp",
    "DeepSpeed": "deepspeed",
    "DeepSpeed ZeRO-2": "deepspeed",
}


def table_rows(path, header_start: str) -> list[list[str]]:
    """The cells of every row of the Markdown table whose header row starts with ``header_start``."""
    lines = (ROOT / path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def names_in(cell: str) -> list[str]:
    return re.findall(r"`(\w+)`", cell)


def test_the_methods_table_has_one_row_per_method_config_with_its_strategies():
    header, _, *rows = table_rows("docs/methods.md", "| method | what it does")
    assert [n for row in rows for n in names_in(row[0])] == [row[0].strip("`") for row in rows]  # one name each
    assert sorted(row[0].strip("`") for row in rows) == METHOD_NAMES
    for row in rows:
        name, cell = row[0].strip("`"), re.sub(r"\s*\(.*?\)", "", row[-1])
        declared = set(method_class(name).supported_strategies)
        listed = (
            {"single_device", "ddp", "fsdp", "deepspeed"}
            if cell == "all"
            else {FAMILIES[part.strip()] for part in cell.split(",")}
        )
        assert listed == declared, name


def test_which_method_runs_where_matches_what_each_method_declares():
    header, _, *rows = table_rows("docs/methods.md", "| method | single device")
    families = [FAMILIES[h] for h in header[1:-1]]
    seen = []
    for row in rows:
        for name in names_in(row[0]):
            seen.append(name)
            cls = method_class(name)
            for family, cell in zip(families, row[1:-1]):
                runs = cell.startswith(("yes", "allowed"))
                assert runs == (family in cls.supported_strategies), f"{name} under {family}: '{cell}'"
            assert row[-1].startswith(("yes", "LoRA only")) == cls.trains_lora, f"{name} LoRA: '{row[-1]}'"
    assert sorted(seen) == METHOD_NAMES


def test_the_readme_lists_every_method():
    readme = (ROOT / "README.md").read_text()
    (group_row,) = [row for row in table_rows("README.md", "| group | options") if row[0] == "`method`"]
    assert sorted(names_in(group_row[1])) == METHOD_NAMES
    section = readme.split("## Methods", 1)[1].split("\n### ", 1)[0]
    assert sorted(re.findall(r"^- `(\w+)`:", section, re.M)) == METHOD_NAMES


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
)
def test_every_relative_link_resolves(page):
    path = ROOT / page
    broken = [
        target
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
        if "://" not in target and not (path.parent / target).exists()
    ]
    assert broken == []

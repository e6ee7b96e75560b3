"""The layout follows the data flow: sources -> parse -> sessions -> coalesce -> stores, with the commands
(cli, daemon, backfill) on top. A module imports from its own stage, later stages and the foundation;
never from an earlier stage or from the top (imports only for type checking aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "harvester"
FOUNDATION = {"events", "timeparse", "escape", "metrics", "native", "options"}
STAGES = [  # in data-flow order
    {"sources", "sources.base", "sources.identity", "sources.compression", "sources.readahead", "sources.rotation",
     "sources.archive", "sources.tail", "sources.rawlog", "sources.journal"},
    {"patterns", "parse"},
    {"sessions"},
    {"coalesce"},
    {"sinks", "sinks.base", "sinks.sqlite", "sinks.cassandra", "sinks.cql", "sinks.sql", "sinks.sql_layouts",
     "sinks.redis", "sinks.tls"},
]
TOP = {"cli", "__main__", "config", "checkpoint", "daemon", "writer", "systemd", "backfill", "segments", "testpatterns",
       "answer", "serve", "tokens"}


def modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".").removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def runtime_imports(name: str) -> set[str]:
    """harvester modules `name` imports when it runs (not those under `if TYPE_CHECKING:`)."""
    path = PACKAGE / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE / name.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.module == "harvester":
            out |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()
                    or (PACKAGE / a.name).is_dir()}
        elif node.module.startswith("harvester."):
            out.add(node.module.removeprefix("harvester."))
    return out


def level(name: str) -> int:
    """-1 foundation, 0.. the stages, len(STAGES) the top."""
    if name in FOUNDATION:
        return -1
    for i, stage in enumerate(STAGES):
        if name in stage:
            return i
    assert name in TOP, f"harvester.{name} is in no layer of tests/test_layout.py: place it"
    return len(STAGES)


def test_every_module_has_a_place():
    for name in modules():
        level(name)


@pytest.mark.parametrize("name", modules())
def test_imports_follow_the_data_flow(name):
    here = level(name)
    for target in runtime_imports(name):
        there = level(target)
        if here == -1:
            assert there == -1, f"foundation module {name} imports {target}"
        else:
            assert there == -1 or here <= there < len(STAGES) or here == len(STAGES), \
                f"{name} (layer {here}) imports {target} (layer {there}): an arrow back up"

"""The house rules that a machine can check, over the package's source (its ASTs: no import
of the package, no dependency): the layers and what may import what (docs/architecture.md,
"Layers"), and the public names.

    leaves (errors, env, grammar, insn, codecache, accelerator, _version)
      < core (pykprobes.core, and the package's public API, `pykprobes`)
      < arch | trace (neither imports the other; trace reaches the core only through the
        public API)
      < boot < control < cli

and: no module imports another module's `_private` name (or reads one off a module it
imported); core/modwatch.py (the import watcher) knows nothing of the registry.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pykprobes"

LEAVES = frozenset({
    "pykprobes.errors", "pykprobes.env", "pykprobes.grammar", "pykprobes.insn",
    "pykprobes.codecache", "pykprobes.accelerator", "pykprobes._version",
})
#: Layer -> rank: a module imports only modules of a lower rank, or of its own layer.
RANKS = {"leaf": 0, "core": 1, "arch": 2, "trace": 2, "boot": 3, "control": 4, "cli": 5}
#: The one edge up the layers: the boot stage starts the control socket when
#: PYKPROBES_CONTROL asks for it, importing it inside that branch only.
UPWARD = frozenset({("pykprobes.boot", "pykprobes.control")})


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()
#: The C extensions (`trace/_speedups.c`...): the accelerators of the modules that load them.
EXTENSIONS = frozenset(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in PACKAGE.rglob("*.c"))


def layer(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the public API: the core's names, served lazily
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


class Import(NamedTuple):
    importer: str
    target: str  # a module of the package (or one of its C extensions)
    name: str | None  # the name taken from it (`from target import name`), if not a module
    line: int


def _imports(module: str, path: Path) -> Iterator[Import]:
    """Every import of the package in `module`, wherever it is (function bodies and
    TYPE_CHECKING blocks included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pykprobes":
                    yield Import(module, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            if base.split(".")[0] != "pykprobes":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES or sub in EXTENSIONS:
                    yield Import(module, sub, None, node.lineno)
                else:
                    yield Import(module, base, alias.name, node.lineno)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _where(imp: Import) -> str:
    taken = f" ({imp.name})" if imp.name else ""
    return f"{MODULES[imp.importer].relative_to(PACKAGE.parent)}:{imp.line}: {imp.target}{taken}"


def test_the_imports_are_found() -> None:
    # The checks below would pass on nothing: make sure they see the package's imports.
    assert len(MODULES) > 50 and len(IMPORTS) > 200
    assert any(i.importer == "pykprobes.core.registry" and i.target == "pykprobes.core.table"
               and i.name == "TABLE" for i in IMPORTS)
    assert "pykprobes.trace._speedups" in EXTENSIONS
    assert layer("pykprobes.trace.events") == "trace" and layer("pykprobes.grammar") == "leaf"


def test_leaves_import_only_leaves() -> None:
    bad = [_where(i) for i in IMPORTS
           if layer(i.importer) == "leaf" and i.target not in EXTENSIONS
           and layer(i.target) != "leaf"]
    assert not bad, "a leaf imports the stdlib and other leaves only:\n" + "\n".join(bad)


def test_no_layer_imports_a_higher_one() -> None:
    bad = [f"{_where(i)}  ({layer(i.importer)} -> {layer(i.target)})" for i in IMPORTS
           if i.target not in EXTENSIONS and (i.importer, i.target) not in UPWARD
           and RANKS[layer(i.target)] > RANKS[layer(i.importer)]]
    assert not bad, "\n".join(bad)


def test_arch_and_trace_do_not_import_each_other() -> None:
    bad = [_where(i) for i in IMPORTS
           if {layer(i.importer), layer(i.target)} == {"arch", "trace"}]
    assert not bad, "\n".join(bad)


def test_trace_reaches_the_core_only_through_the_public_api() -> None:
    bad = [_where(i) for i in IMPORTS
           if layer(i.importer) == "trace" and i.target.startswith("pykprobes.core")]
    assert not bad, "trace imports `pykprobes` (the public API), not core modules:\n" + \
        "\n".join(bad)


def test_modwatch_knows_nothing_of_the_registry() -> None:
    bad = [_where(i) for i in IMPORTS
           if i.importer == "pykprobes.core.modwatch" and i.target.startswith("pykprobes.core")]
    assert not bad, "modwatch takes a listener; it imports no core module:\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_from_another_module() -> None:
    bad = [_where(i) for i in IMPORTS
           if i.name is not None and _private(i.name) and i.target != i.importer]
    assert not bad, "\n".join(bad)


def _private_reads(module: str, path: Path) -> Iterator[str]:
    """`mod._name` where `mod` names a module of the package that `module` imported."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pykprobes" and alias.asname:
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pykprobes"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:
                    bound[alias.asname or alias.name] = sub
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in bound and _private(node.attr) and \
                bound[node.value.id] != module:
            yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: " \
                  f"{node.value.id}.{node.attr}"


def test_no_private_name_is_read_off_another_module() -> None:
    bad = [w for module, path in MODULES.items() for w in _private_reads(module, path)]
    assert not bad, "\n".join(bad)


def test_the_public_api_lists_what_it_serves() -> None:
    """`pykprobes.__all__` (a literal list, for type checkers) names exactly the lazily
    served names, each importable."""
    import pykprobes

    assert set(pykprobes.__all__) == {"__version__", *pykprobes._EXPORTS}
    assert len(pykprobes.__all__) == len(set(pykprobes.__all__))


@pytest.mark.parametrize("rule", [
    ("pykprobes.trace.x", "pykprobes.core.table"),
    ("pykprobes.errors", "pykprobes.core.probe"),
    ("pykprobes.core.x", "pykprobes.trace.events"),
    ("pykprobes.boot.stage", "pykprobes.cli.run"),
    ("pykprobes.control.server", "pykprobes.cli.main"),
])
def test_the_layer_rules_catch_a_bad_import(rule: tuple[str, str]) -> None:
    importer, target = rule
    rank_broken = RANKS[layer(target)] > RANKS[layer(importer)]
    trace_to_core = layer(importer) == "trace" and target.startswith("pykprobes.core")
    assert rank_broken or trace_to_core

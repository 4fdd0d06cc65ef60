"""Source lines to probe addresses (`perf probe`'s `FILE:LINE`), and the code of a module that
is not imported yet, read from its source as its import will."""

from __future__ import annotations

import os
import sys
import tokenize
from types import CodeType

from pykprobes.core import resolve
from pykprobes.core.address import ProbeAddress, line_addresses
from pykprobes.core.table import TABLE
from pykprobes.errors import enoent


def _walk(code: CodeType) -> list[CodeType]:
    out = [code]
    for const in code.co_consts:
        if isinstance(const, CodeType):
            out.extend(_walk(const))
    return out


def resolve_line(spec: str) -> list[ProbeAddress]:
    """Every probe address of `"path/to/file.py:LINE"` in an imported module: the start of
    each run of that line's instructions, in every function (nested ones included).

    A line may give several addresses: a loop header, a comprehension (its own code object
    before 3.12), a line split across branches. Top-level lines of an imported module have
    already run and give none. Raises ENOENT if the file is not an imported module's or
    no function has code on that line.
    """
    path, lineno = resolve.split_line_spec(spec)
    mod = resolve.module_of_file(path)
    if mod is None:
        raise enoent(f"{spec}: {path} is not the source of an imported module")
    addresses: list[ProbeAddress] = []
    seen: set[int] = set()
    for top in resolve.iter_module_functions(mod):
        for code in _walk(TABLE.original(top)):
            if id(code) in seen or code.co_filename != top.co_filename:
                continue
            seen.add(id(code))
            addresses.extend(ProbeAddress(code, off) for off in line_addresses(code, lineno))
    if not addresses:
        raise enoent(f"{spec}: no function of {mod.__name__} has code on line {lineno}")
    addresses.sort(key=lambda a: (a.code.co_firstlineno, a.offset))
    return addresses


def module_name_for_file(path: str) -> str | None:
    """The name a source file that is not imported yet will be imported under: declared by
    `pykprobes run` for its script (`__main__`), or the dotted path below a sys.path entry."""
    real = os.path.realpath(path)
    if real in TABLE.modules.expected_files:
        return TABLE.modules.expected_files[real]
    stem, ext = os.path.splitext(real)
    if ext not in (".py", ".pyw"):
        return None
    for entry in sys.path:
        base = os.path.realpath(entry or os.getcwd())
        if stem.startswith(base + os.sep):
            parts = stem[len(base) + 1:].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and all(p.isidentifier() for p in parts):
                return ".".join(parts)
    return None


def line_symbols(spec: str) -> list[tuple[str, str, int]]:
    """For a line in a file that is not imported yet: (module, qualname, offset) of every
    probe address of the line, from compiling the file the way the import will (the same
    source and interpreter give the same code tree), so that each can wait for the import
    as a symbol probe. Top-level lines give `<module>` addresses. Raises ENOENT."""
    path, lineno = resolve.split_line_spec(spec)
    module = module_name_for_file(path)
    if module is None:
        raise enoent(f"{spec}: {path} is neither imported nor importable from sys.path")
    root = _compile_file(path, spec)
    found: list[tuple[str, str, int]] = []
    for code in _walk(root):
        qualname = resolve.MODULE_CODE if code is root else code.co_qualname
        found.extend((module, qualname, off) for off in line_addresses(code, lineno))
    if not found:
        raise enoent(f"{spec}: no code on line {lineno}")
    return found


def _compile_file(path: str, what: str) -> CodeType:
    """A source file compiled the way its import will compile it (the same source and
    interpreter give the same code tree). ENOENT if it cannot be read or compiled."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        return compile(source, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as exc:
        raise enoent(f"{what}: cannot read {path}: {exc}") from exc


def code_before_import(symbol: str) -> CodeType | None:
    """The code object that `symbol` ("pkg.mod:Qual.name", or "pkg.mod:<module>") names in a
    module that is not imported yet, as its import will create it, without running anything
    of it (`module_code_before_import`). None when that code cannot be read before the
    import. Raises KprobeError as registration will when the module is imported: ENOENT (no
    such function), EADDRNOTAVAIL (the qualname is not unique). For checking a definition
    before the import: the names its code has (parameters, variables) are those the
    imported code will have."""
    module, qualname = resolve.split_symbol(symbol)
    root = module_code_before_import(module, symbol)
    if root is None:
        return None
    return resolve.resolve_in_code(module, root, qualname).code


def module_code_before_import(module: str, what: str | None = None) -> CodeType | None:
    """The code object `import module` will run, without running anything of it: the
    module's source compiled, or its cached bytecode read, by the standard file loaders (or
    the file `pykprobes run` declared for it). None when it cannot be read before the import
    (no such module on the path, another kind of loader); ENOENT when it cannot be read or
    compiled."""
    import importlib.machinery

    what = what or module
    declared = [path for path, name in TABLE.modules.expected_files.items() if name == module]
    if declared:
        return _compile_file(declared[0], what)
    spec = resolve.find_spec(module)
    loader = spec.loader if spec is not None else None
    if not isinstance(loader, (importlib.machinery.SourceFileLoader,
                               importlib.machinery.SourcelessFileLoader)):
        return None
    try:
        code = loader.get_code(module)
    except (ImportError, OSError, SyntaxError, ValueError) as exc:
        raise enoent(f"{what}: cannot read the code of {module}: {exc}") from exc
    return code if isinstance(code, CodeType) else None

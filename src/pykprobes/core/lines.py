"""Source lines to probe addresses (`perf probe`'s `FILE:LINE`)."""

from __future__ import annotations

from types import CodeType

from pykprobes.core import resolve
from pykprobes.core.address import ProbeAddress, line_addresses
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
    from pykprobes.core.registry import _original

    path, lineno = resolve.split_line_spec(spec)
    mod = resolve.module_of_file(path)
    if mod is None:
        raise enoent(f"{spec}: {path} is not the source of an imported module")
    addresses: list[ProbeAddress] = []
    seen: set[int] = set()
    for top in resolve.iter_module_functions(mod):
        for code in _walk(_original(top)):
            if id(code) in seen or code.co_filename != top.co_filename:
                continue
            seen.add(id(code))
            addresses.extend(ProbeAddress(code, off) for off in line_addresses(code, lineno))
    if not addresses:
        raise enoent(f"{spec}: no function of {mod.__name__} has code on line {lineno}")
    addresses.sort(key=lambda a: (a.code.co_firstlineno, a.offset))
    return addresses

"""Symbol resolution: `"pkg.mod:Qual.name"` to a code object (the kernel's kallsyms lookup).

Two roads lead to the code object:

* the module is imported: walk its namespace by the qualname's parts (`vars()`, never
  `getattr`, so no property or `__getattr__` of the program runs), unwrap static/class
  methods, properties and decorators (`__wrapped__`), and go through `<locals>` by walking
  the enclosing function's code constants;
* the module is not imported yet (or its top-level code is wanted): walk the module's
  code object, handed over by the import hook before the body runs, by `co_qualname`.

Either way the result carries the chain of enclosing code objects that hold it as a
constant, which the optimizer needs to switch nested functions to rewritten code.

Lazy imports (PEP 810, 3.15): a module imported with `lazy import` (or listed in
`__lazy_modules__`) is not in `sys.modules` until it is first used, so its probes wait, and
the module notifier arms them when it is really loaded, before its body runs. Resolving never
loads it: a lazy name met in a namespace (a `types.LazyImportType` object, which loads its
module when its attributes are read) is refused, not looked into.
"""

from __future__ import annotations

import errno
import os
import sys
import types
from collections.abc import Iterator
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import Any

from pykprobes.errors import KprobeError, einval, enoent

MODULE_CODE = "<module>"

#: The object a lazy import binds until its module is loaded (PEP 810; None before 3.15).
_LAZY_IMPORT: type | None = getattr(types, "LazyImportType", None)


class Target:
    """A resolved code object and how it is held.

    `parent` is the enclosing code's Target when this code is a constant of it (a nested
    function, a class body, a method of a class not yet created); `const_index` is its
    index in `parent.code.co_consts`. A Target without a parent is held by function objects.
    """

    __slots__ = ("code", "const_index", "module", "parent")

    def __init__(
        self,
        module: str,
        code: CodeType,
        parent: Target | None = None,
        const_index: int | None = None,
    ) -> None:
        self.module = module
        self.code = code
        self.parent = parent
        self.const_index = const_index


def split_symbol(symbol: str) -> tuple[str, str]:
    """`"pkg.mod:Qual.name"` -> (`"pkg.mod"`, `"Qual.name"`)."""
    module, sep, qualname = symbol.partition(":")
    if not sep or not module or not qualname:
        raise einval(f"symbol {symbol!r} is not of the form 'pkg.mod:Qual.name'")
    if not all(part.isidentifier() for part in module.split(".")):
        raise einval(f"{module!r} is not a module name")
    return module, qualname


def module_exists(name: str) -> bool:
    """Whether `import name` could find a module, without importing anything.

    `importlib.util.find_spec("a.b")` imports `a`; probing must not run the program's
    code, so walk the path finders component by component instead.
    """
    import importlib.machinery

    if name in sys.modules or name in sys.builtin_module_names:
        return True
    path: list[str] | None = None
    parts = name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1])
        mod = sys.modules.get(prefix)
        if mod is not None:
            path = list(getattr(mod, "__path__", []) or [])
            continue
        spec = importlib.machinery.PathFinder.find_spec(prefix, path)
        if spec is None and path is None:
            try:
                spec = importlib.machinery.FrozenImporter.find_spec(prefix)
            except (ImportError, ValueError):
                spec = None
        if spec is None:
            return False
        path = list(spec.submodule_search_locations or [])
    return True


def _lookup(obj: Any, name: str) -> Any:
    """`obj.name` without running the program's code: the instance/class `__dict__` along
    the MRO for classes, the namespace for modules."""
    if isinstance(obj, type):
        for klass in obj.__mro__:
            ns = vars(klass)
            if name in ns:
                return ns[name]
        raise KeyError(name)
    if isinstance(obj, property):
        if name in ("fget", "fset", "fdel"):
            value = getattr(obj, name)
            if value is None:
                raise KeyError(name)
            return value
        raise KeyError(name)
    ns = getattr(obj, "__dict__", None)
    if isinstance(ns, dict) and name in ns:
        return ns[name]
    raise KeyError(name)


def _as_function(obj: Any) -> Any:
    """Unwrap what stands in front of a function's code in a namespace."""
    if isinstance(obj, (staticmethod, classmethod)):
        return obj.__func__
    if isinstance(obj, MethodType):
        return obj.__func__
    if isinstance(obj, property):
        return obj.fget
    func = getattr(type(obj), "func", None)  # functools.cached_property keeps .func
    if func is not None and type(obj).__name__ == "cached_property":
        return obj.func
    return obj


def _code_of(obj: Any, qualname: str) -> CodeType | None:
    """The code object of a (possibly decorated) function for `qualname`: decorators made
    with functools.wraps copy `__qualname__` but keep their own code, so follow
    `__wrapped__` until the code's own qualname matches."""
    seen: set[int] = set()
    best: CodeType | None = None
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        obj = _as_function(obj)
        code = getattr(obj, "__code__", None) if isinstance(obj, FunctionType) else None
        if isinstance(code, CodeType):
            if best is None:
                best = code
            if code.co_qualname == qualname:
                return code
        try:
            obj = vars(obj).get("__wrapped__") if hasattr(obj, "__dict__") else None
        except TypeError:
            obj = None
    return best


def iter_code_tree(
    code: CodeType, module: str, parent: Target | None = None
) -> Iterator[Target]:
    """Every code object nested in `code`, depth first, each with its holder chain."""
    for index, const in enumerate(code.co_consts):
        if isinstance(const, CodeType):
            child = Target(module, const, parent, index)
            yield child
            yield from iter_code_tree(const, module, child)


def _unique(matches: list[Target], symbol: str) -> Target:
    if not matches:
        raise enoent(f"no code for symbol {symbol!r}")
    if len(matches) > 1:
        lines = ", ".join(str(t.code.co_firstlineno) for t in matches)
        raise KprobeError(errno.EADDRNOTAVAIL,
                          f"the symbol {symbol!r} is not unique (lines {lines})")
    return matches[0]


def resolve_in_code(module: str, module_code: CodeType, qualname: str) -> Target:
    """Resolve in a module's code object, before its body has run."""
    root = Target(module, module_code)
    if qualname == MODULE_CODE:
        return root
    matches = [t for t in iter_code_tree(module_code, module, root)
               if t.code.co_qualname == qualname]
    return _unique(matches, f"{module}:{qualname}")


def resolve_imported(mod: ModuleType, qualname: str) -> Target:
    """Resolve in an imported module's namespace."""
    name = mod.__name__
    symbol = f"{name}:{qualname}"
    if qualname == MODULE_CODE:
        raise enoent(f"{symbol}: the module is imported, its top-level code has already run "
                     "(probe it before the import)")
    parts = qualname.split(".")
    obj: Any = mod
    for i, part in enumerate(parts):
        if part == "<locals>":
            code = _code_of(obj, ".".join(parts[:i]))
            if code is None:
                raise enoent(f"{symbol}: {'.'.join(parts[:i])} is not a function")
            root = Target(name, code)
            matches = [t for t in iter_code_tree(code, name, root)
                       if t.code.co_qualname == qualname]
            return _unique(matches, symbol)
        try:
            obj = _lookup(obj, part)
        except KeyError:
            return _search_namespace(mod, qualname, symbol)
        if type(obj) is _LAZY_IMPORT:
            raise enoent(
                f"{symbol}: {name}:{'.'.join(parts[: i + 1])} is a lazy import (PEP 810) "
                "not resolved yet: name the code in the module it imports (a probe there "
                "waits for that module)"
            )
    code = _code_of(obj, qualname)
    if code is None:
        if isinstance(obj, type):
            raise einval(f"{symbol} is a class: probe one of its methods")
        raise einval(f"{symbol} is not Python code (a {type(obj).__name__})")
    return Target(name, code)


def iter_module_functions(mod: ModuleType) -> Iterator[CodeType]:
    """The code of every function reachable from a module's namespace: functions, methods
    (static, class, properties), nested classes, decorated functions' wrapped code."""
    name = mod.__name__
    # A decorator's wrapper copies __module__ (functools.wraps) but its code lives in the
    # decorator's file: only code compiled from this module's file belongs to it.
    file = getattr(mod, "__file__", None)
    seen: set[int] = set()
    stack: list[Any] = list(vars(mod).values())
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, type):
            if obj.__module__ == name:
                stack.extend(vars(obj).values())
            continue
        if isinstance(obj, property):
            stack.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
            continue
        obj = _as_function(obj)
        if isinstance(obj, FunctionType) and obj.__module__ == name:
            if file is None or obj.__code__.co_filename == file:
                yield obj.__code__
            wrapped = vars(obj).get("__wrapped__")
            if wrapped is not None:
                stack.append(wrapped)


def _search_namespace(mod: ModuleType, qualname: str, symbol: str) -> Target:
    """Fallback for names the attribute walk cannot reach, such as a module-level lambda
    (`<lambda>`) or a function stored under another name: unique by `co_qualname`."""
    matches = [Target(mod.__name__, code) for code in iter_module_functions(mod)
               if code.co_qualname == qualname]
    return _unique(matches, symbol)


def module_of_file(path: str) -> ModuleType | None:
    """The imported module whose source file is `path`."""
    want = os.path.realpath(path)
    for mod in list(sys.modules.values()):
        file = getattr(mod, "__file__", None)
        if isinstance(file, str) and os.path.realpath(file) == want:
            return mod
    return None


def split_line_spec(spec: str) -> tuple[str, int]:
    """`"path/to/file.py:LINE"` -> (path, line)."""
    path, sep, line = spec.rpartition(":")
    if not sep or not path or not line.isdigit() or int(line) <= 0:
        raise einval(f"{spec!r} is not of the form 'path/to/file.py:LINE'")
    return path, int(line)

"""Symbol resolution: `"pkg.mod:Qual.name"` to a code object (the kernel's kallsyms lookup).

Two roads lead to the code object:

* the module is imported: walk its namespace by the qualname's parts (`vars()`, never
  `getattr`, so no property or `__getattr__` of the program runs), unwrap static/class
  methods, properties and decorators (`__wrapped__`), and go through `<locals>` by walking
  the enclosing function's code constants;
* the module is not imported yet (or its top-level code is wanted): walk the module's
  code object, handed over by the import hook before the body runs, by `co_qualname`.

Either way the result carries the chain of enclosing code objects that hold it as a
constant, which the optimizer needs to switch nested functions to rewritten code: a code
object found any other way (a function or code object given as the address, a line's
address) gets its chain from `holder_chain()`. Probed functions may run pykprobes'
rewritten copies: resolution maps every code it meets back to the compiled original (the
`original` argument), so that addresses and chains are always the program's own code.

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
from collections.abc import Callable, Iterator
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import TYPE_CHECKING, Any

from pykprobes.errors import KprobeError, einval, enoent

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

MODULE_CODE = "<module>"

#: The object a lazy import binds until its module is loaded (PEP 810; None before 3.15).
_LAZY_IMPORT: type | None = getattr(types, "LazyImportType", None)

#: CO_OPTIMIZED: a function's code (a class body or a module has none).
_CO_OPTIMIZED = 0x01
#: Py_TPFLAGS_HEAPTYPE: a class created by a class statement (or type()), not by C code.
_HEAPTYPE = 1 << 9

#: Maps a code object a function holds now to the one the program compiled (the table's
#: `original`: pykprobes may have switched the function to a rewritten copy).
Original = Callable[[CodeType], CodeType]


def _same(code: CodeType) -> CodeType:
    return code


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
    if type(symbol) is not str:
        raise einval(f"symbol_name must be a str 'pkg.mod:Qual.name', not {symbol!r}")
    module, sep, qualname = symbol.partition(":")
    if not sep or not module or not qualname:
        raise einval(f"symbol {symbol!r} is not of the form 'pkg.mod:Qual.name'")
    if not all(part.isidentifier() for part in module.split(".")):
        raise einval(f"{module!r} is not a module name")
    return module, qualname


def module_exists(name: str) -> bool:
    """Whether `import name` could find a module, without importing anything."""
    return name in sys.modules or name in sys.builtin_module_names or find_spec(name) is not None


def find_spec(name: str) -> ModuleSpec | None:
    """The spec `import name` would find on the path (or frozen), without importing anything.

    `importlib.util.find_spec("a.b")` imports `a`; probing must not run the program's
    code, so walk the path finders component by component instead, through the packages
    that are imported already.
    """
    import importlib.machinery

    path: list[str] | None = None
    parts = name.split(".")
    spec: ModuleSpec | None = None
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1])
        mod = sys.modules.get(prefix)
        if mod is not None and i < len(parts) - 1:
            path = list(getattr(mod, "__path__", []) or [])
            found = vars(mod).get("__spec__") if isinstance(mod, ModuleType) else None
            spec = found if isinstance(found, importlib.machinery.ModuleSpec) else None
            continue
        spec = importlib.machinery.PathFinder.find_spec(prefix, path)
        if spec is None and path is None:
            try:
                spec = importlib.machinery.FrozenImporter.find_spec(prefix)
            except (ImportError, ValueError):
                spec = None
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or [])
    return spec


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
    namespace = getattr(obj, "__dict__", None)
    if isinstance(namespace, dict) and name in namespace:
        return namespace[name]
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
    symbol = f"{module}:{qualname}"
    matches = [t for t in iter_code_tree(module_code, module, root)
               if t.code.co_qualname == qualname]
    return _unique(matches, symbol)


def is_class_body(code: CodeType) -> bool:
    """A class body's code (a module's has no qualname of its own to be named by)."""
    return not code.co_flags & _CO_OPTIMIZED


def resolve_imported(mod: ModuleType, qualname: str, original: Original = _same) -> Target:
    """Resolve in an imported module's namespace, to original code (see `Original`)."""
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
            # The function may hold a rewritten copy whose constants are rewritten too:
            # walk the original's.
            code = original(code)
            root = Target(name, code)
            matches = [t for t in iter_code_tree(code, name, root)
                       if t.code.co_qualname == qualname]
            return _unique(matches, symbol)
        try:
            obj = _lookup(obj, part)
        except KeyError:
            return _search_namespace(mod, qualname, symbol, original)
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
    return Target(name, original(code))


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
        elif not type(obj).__flags__ & _HEAPTYPE:
            # A wrapper written in C (functools.lru_cache, partial objects have none):
            # its instance dict holds `__wrapped__` (update_wrapper) and no code of the
            # program runs to read it, as a class defined in Python could make it.
            ns = getattr(obj, "__dict__", None)
            wrapped = ns.get("__wrapped__") if type(ns) is dict else None
            if isinstance(wrapped, FunctionType):
                stack.append(wrapped)


def _search_namespace(
    mod: ModuleType, qualname: str, symbol: str, original: Original
) -> Target:
    """Fallback for names the attribute walk cannot reach, such as a module-level lambda
    (`<lambda>`) or a function stored under another name: unique by `co_qualname`."""
    codes = {id(c): c for c in map(original, iter_module_functions(mod))}
    matches = [Target(mod.__name__, code) for code in codes.values()
               if code.co_qualname == qualname]
    return _unique(matches, symbol)


def holder_chain(target: Target, mod: ModuleType, original: Original) -> Target:
    """`target` with the longest chain of code objects that hold its code as a constant,
    looked for in the code of `mod`'s functions (by identity; the code is original code),
    so that the optimizer can reach the functions that will be made from it: a closure, a
    nested function, a generator expression or a comprehension gets its new function
    objects from its parent's constants at each call of the parent, and those must be the
    rewritten code. A code no function of `mod` nests is held by function objects only.

    A function in the namespace may itself be a closure (a method made by a factory at
    import): its code is then nested in the factory's too, and the longest chain, the one
    that starts at the outermost function, is the one that holds it. The chain `target`
    already has (from `<locals>`) is kept unless a longer one is found."""
    found = _module_chains(mod, original, target.code).get(id(target.code))
    if found is None or found.code is not target.code or _depth(found) <= _depth(target):
        return target
    return found


#: module name -> (module, id(code) -> the longest chain holding that code), for every
#: code of the module's functions: code trees never change, so a chain found stays true;
#: the module is walked again only for a code it did not have (defined since).
_chains: dict[str, tuple[ModuleType, dict[int, Target]]] = {}


def _module_chains(mod: ModuleType, original: Original, code: CodeType) -> dict[int, Target]:
    name = mod.__name__
    entry = _chains.get(name)
    if entry is not None and entry[0] is mod:
        known = entry[1].get(id(code))
        if known is not None and known.code is code:
            return entry[1]
    chains: dict[int, Target] = {}
    for top in iter_module_functions(mod):
        root = original(top)
        chains.setdefault(id(root), Target(name, root))
        for found in iter_code_tree(root, name, Target(name, root)):
            seen = chains.get(id(found.code))
            if seen is None or _depth(found) > _depth(seen):
                chains[id(found.code)] = found
    _chains[name] = (mod, chains)
    return chains


def _depth(target: Target) -> int:
    n = 0
    while target.parent is not None:
        target = target.parent
        n += 1
    return n


def module_of_file(path: str) -> ModuleType | None:
    """The imported module whose source file is `path`.

    A code object's `co_filename` is the very string its module's `__file__` is (both come
    from the spec's origin): that is looked for first, with no file system access. Only a
    path given otherwise (relative, through a symlink) is compared by `realpath`, each
    module's cached: resolving one every module's path anew made a registration stat the
    file system some 80 times, and take a second while other threads held the GIL."""
    modules = list(sys.modules.values())
    for mod in modules:
        if _file_of(mod) == path:
            return mod
    want = _realpath(path)
    for mod in modules:
        file = _file_of(mod)
        if file is not None and _realpath(file) == want:
            return mod
    return None


def _file_of(mod: object) -> str | None:
    # The module's dict, never getattr: a module's __getattr__ (PEP 562) is program code.
    ns = getattr(mod, "__dict__", None) if isinstance(mod, ModuleType) else None
    file = ns.get("__file__") if type(ns) is dict else None
    return file if type(file) is str else None


#: realpath() of absolute paths already resolved (module files, mostly).
_realpaths: dict[str, str] = {}


def _realpath(path: str) -> str:
    real = _realpaths.get(path)
    if real is None:
        real = os.path.realpath(path)
        if os.path.isabs(path):  # a relative one depends on the working directory
            _realpaths[path] = real
    return real


def split_line_spec(spec: str) -> tuple[str, int]:
    """`"path/to/file.py:LINE"` -> (path, line). A path that no file can have (a NUL, a
    character the file system encoding cannot encode, such as a lone surrogate) is ENOENT,
    as the kernel's FILE_NOT_FOUND, rather than the ValueError os.stat() would raise."""
    if type(spec) is not str:
        raise einval(f"a line target must be a str 'path/to/file.py:LINE', not {spec!r}")
    path, sep, line = spec.rpartition(":")
    if (not sep or not path or not line.isascii() or not line.isdigit() or len(line) > 9
            or int(line) <= 0):
        raise einval(f"{spec!r} is not of the form 'path/to/file.py:LINE'")
    try:
        os.fsencode(path)
    except UnicodeError:
        raise enoent(f"{spec!r}: no file can have this path") from None
    if "\0" in path:
        raise enoent(f"{spec!r}: no file can have this path")
    return path, int(line)

"""What rewritten code calls is reached by name, never held in its constants.

A call sequence needs its callable (a site's hit, a return hook, a recorder) on the stack.
Loaded with LOAD_CONST, it would sit in `co_consts`, and the rewritten code could no longer
be serialized as the program's own code is: `marshal.dumps(f.__code__)` raises on a
function object in the constants, and cloudpickle (how joblib, dask and ray ship functions
defined in `__main__` or as closures) pickles the constants by value, reaching into the
registry. So an injected LOAD_CONST of anything marshal cannot write becomes

    LOAD_GLOBAL  __pykprobes_call_N__      (a `Callee`, no NULL pushed: LOAD_CONST's effect)
    LOAD_ATTR    func                      (the callable itself; a slot: one cheap load)

and the code holds only a name. The name is published in `builtins`, so that the code
finds it wherever it runs in this process (a module body, a function with globals of its
own), and, through `share()`, in the globals of the module whose functions run the code,
because cloudpickle ships with a function the globals its code names that its
`__globals__` has (and no builtin). A `Callee` pickles as `functools.partial(stand_in)`,
whose `func` is a harmless stand-in from the standard library: the function rebuilt in
another process (where pykprobes may not even be installed) behaves as the original,
calling that stand-in where the probe was.

A name lives as long as the code object that names it (a finalizer on the code): the
functions, frames and tracebacks still running a replaced version keep finding it, and once
the last one is gone the name leaves `builtins` and the globals it was shared in.
"""

from __future__ import annotations

import builtins
import functools
import itertools
import typing
import weakref
from collections.abc import Callable, MutableMapping
from types import CodeType
from typing import Any, Final

#: A harmless call of any arguments that drops them: what a probe's call becomes in a
#: function unpickled elsewhere. str.format without replacement fields reads no argument
#: (no __format__ or __repr__ of the program runs) and returns "" (false: a compiled call's
#: recorder that returns it leaves the hit uncalled).
DROP: Final[Callable[..., Any]] = "".format
#: A harmless call of no argument that returns None: what an inline hit's `enter` becomes
#: (the code then skips the handler call).
NONE: Final[Callable[[], None]] = [].clear
#: A harmless call of one argument that returns it (the 3.11 StopIteration converter).
SAME: Final[Callable[..., Any]] = functools.partial(typing.cast, None)

_PREFIX: Final = "__pykprobes_call_"
_numbers = itertools.count()
_builtins: Final[dict[str, Any]] = builtins.__dict__


class Callee:
    """The global a call sequence loads: `func` is what it calls."""

    __slots__ = ("func", "stand_in")

    def __init__(self, func: Any, stand_in: Any) -> None:
        self.func = func
        self.stand_in = stand_in

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (functools.partial, (self.stand_in,))

    def __copy__(self) -> Callee:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Callee:
        return self

    def __repr__(self) -> str:
        return f"<pykprobes call of {self.func!r}>"


def new_name() -> str:
    return f"{_PREFIX}{next(_numbers)}__"


class _Published:
    """The names one code object reads, and the namespaces they were put in."""

    __slots__ = ("names", "spaces")

    def __init__(self, names: dict[str, Callee]) -> None:
        self.names = names
        self.spaces: list[MutableMapping[str, Any]] = [_builtins]


#: id(code) -> what it published (the entry goes with the code).
_published: dict[int, _Published] = {}


def publish(code: CodeType, names: dict[str, Callee]) -> None:
    """Make `names` visible to `code` wherever it runs, for as long as it exists."""
    if not names:
        return
    entry = _Published(names)
    _builtins.update(names)
    _published[id(code)] = entry
    final = weakref.finalize(code, _withdraw, id(code), entry)
    final.atexit = False


def share(code: CodeType, namespace: MutableMapping[str, Any]) -> None:
    """Put the names `code` reads in `namespace` too (the globals of its functions)."""
    entry = _published.get(id(code))
    if entry is None or any(space is namespace for space in entry.spaces):
        return
    for name, callee in entry.names.items():
        namespace.setdefault(name, callee)
    entry.spaces.append(namespace)


def names_of(code: CodeType) -> dict[str, Callee]:
    """The names `code` reads (for tests)."""
    entry = _published.get(id(code))
    return dict(entry.names) if entry is not None else {}


def _withdraw(key: int, entry: _Published) -> None:
    if _published.get(key) is entry:
        del _published[key]
    for space in entry.spaces:
        for name, callee in entry.names.items():
            try:
                if space.get(name) is callee:
                    del space[name]
            except Exception:  # noqa: BLE001 - a namespace torn down at exit
                pass

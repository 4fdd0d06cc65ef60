"""The import system's side of the module notifier (the kernel's `kprobe_module_nb`).

A finder at the front of `sys.meta_path` that only looks at the modules the listener cares
about (a set lookup for every other import): for those it lets the other finders find the
spec, then wraps that spec's loader so that the listener sees the module's code object
*before the body runs* (and may hand back other code to run) and hears when the body has run.
An import of a module that is already imported is a reload: the listener hears that its old
code is gone first.

The listener is the table's module notifier (core/modules.py); this module imports nothing
of the core. It is called outside of any lock held here (wrapt's rule).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import CodeType, ModuleType
from typing import Any, Protocol


class ModuleListener(Protocol):
    """What the watch tells (core/modules.py ModuleNotifier)."""

    def coming(self, name: str) -> None:
        """A watched module's code is loaded for an import (MODULE_STATE_COMING)."""

    def loaded(self, name: str, code: CodeType) -> CodeType:
        """Its code is about to run: the code to run instead (or `code`)."""

    def executed(self, name: str, code: CodeType) -> None:
        """Its body ran (or raised), from `code` as given to `loaded`."""

    def gone(self, name: str) -> None:
        """It is reloaded: the code its probes were on is gone."""

    def probed(self, name: str) -> bool:
        """Whether probes are on it (its module object is then watched for leaving)."""


class ImportWatch:
    """The meta path finder. It never finds a module itself."""

    def __init__(self, listener: ModuleListener) -> None:
        self.listener = listener
        #: Names whose imports we intercept.
        self.names: set[str] = set()
        #: name -> the module object probes were armed on (to notice it leaving sys.modules).
        self.objects: dict[str, ModuleType] = {}
        self._local = threading.local()

    def watch(self, name: str, module: ModuleType | None = None) -> None:
        self.names.add(name)
        if module is not None:
            self.objects[name] = module

    def vanished(self) -> list[str]:
        """Watched modules that were removed from (or replaced in) sys.modules."""
        gone = [name for name, mod in self.objects.items() if sys.modules.get(name) is not mod]
        for name in gone:
            del self.objects[name]
        return gone

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in self.names or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = self._find_elsewhere(name, path, target)
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None:
            return spec
        if target is not None or name in sys.modules:
            self.listener.gone(name)  # a reload: the old code is gone
            self.objects.pop(name, None)
        self._wrap_loader(name, spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass

    def _find_elsewhere(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: ModuleSpec | None = find(name, path, target)
            if spec is not None:
                return spec
        return None

    def _wrap_loader(self, name: str, loader: Any) -> None:
        get_code = getattr(loader, "get_code", None)
        exec_module = getattr(loader, "exec_module", None)
        if get_code is None or exec_module is None:
            return  # an extension module or a loader we cannot see into: no Python code
        listener = self.listener
        objects = self.objects
        seen: list[CodeType] = []

        def notified_get_code(fullname: str) -> CodeType | None:
            code = get_code(fullname)
            if isinstance(code, CodeType) and fullname == name:
                seen.append(code)
                listener.coming(name)
                return listener.loaded(name, code)
            return code  # type: ignore[no-any-return]

        def notified_exec_module(module: ModuleType) -> None:
            try:
                exec_module(module)
            finally:
                if seen:
                    listener.executed(name, seen[-1])
                if listener.probed(name):
                    objects[name] = module

        loader.get_code = notified_get_code
        loader.exec_module = notified_exec_module

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)

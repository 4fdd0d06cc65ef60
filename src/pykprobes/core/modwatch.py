"""The module notifier (the kernel's `kprobe_module_nb`), on the import system.

A finder at the front of `sys.meta_path` that only looks at the modules pykprobes cares
about (a set lookup for every other import): for those it lets the other finders find the
spec, then wraps that spec's loader so that the core sees the module's code object *before
the body runs* (pending probes are armed on it, and rewritten code can be substituted) and
hears when the body has run. An import of a module that is already imported is a reload:
its probes are GONE, as when the kernel unloads a module.

Clients hear of it too, as kernel code registers on the module notifier chain
(`register_module_notifier`): `notifier(name)` is called when a watched module's code is
loaded for an import (MODULE_STATE_COMING: a first import, a reload, or an import again after
the module left sys.modules), before its body runs and before the pending probes are armed on
that code. A probe it registers on that module then waits for this very code, even in a
reload (the kernel's trace_kprobe_module_callback() re-registers the events of a module that
comes back this way).

The registry is called outside of any lock held here (wrapt's rule), and the registry
never imports while holding its own lock.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import CodeType, ModuleType
from typing import Any

from pykprobes.core import registry
from pykprobes.core.site import kprobe_busy

#: Names whose imports we intercept.
_names: set[str] = set()
#: name -> the module object probes were armed on (to notice it leaving sys.modules).
_objects: dict[str, ModuleType] = {}
_local = threading.local()
#: The module notifier chain: called with the name of a watched module whose code comes.
_notifiers: list[Callable[[str], None]] = []


def register_module_notifier(notifier: Callable[[str], None]) -> None:
    """Call `notifier(name)` whenever the code of a module with probes (or probes waiting
    for it) is loaded for an import, before its body runs (see the module docstring). Never
    raised into the import: a notifier that raises is reported as a warning."""
    if notifier not in _notifiers:
        _notifiers.append(notifier)


def unregister_module_notifier(notifier: Callable[[str], None]) -> None:
    if notifier in _notifiers:
        _notifiers.remove(notifier)


def _notify_coming(name: str) -> None:
    if not _notifiers:
        return
    # What the notifiers register on the module waits for the code now loaded, though a
    # reloaded module is still in sys.modules.
    registry.expect_module(name)
    for notifier in list(_notifiers):
        try:
            notifier(name)
        except Exception as exc:  # noqa: BLE001 - never break the program's import
            registry._warn(f"pykprobes: a module notifier failed for {name}: {exc!r}")


def watch(name: str, module: ModuleType | None = None) -> None:
    _names.add(name)
    if module is not None:
        _objects[name] = module


def vanished() -> list[str]:
    """Watched modules that were removed from (or replaced in) sys.modules."""
    gone = [name for name, mod in _objects.items() if sys.modules.get(name) is not mod]
    for name in gone:
        del _objects[name]
    return gone


class ModuleNotifier:
    """The meta path finder. It never finds a module itself."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in _names or getattr(_local, "busy", False):
            return None
        _local.busy = True
        try:
            spec = _find_elsewhere(self, name, path, target)
        finally:
            _local.busy = False
        if spec is None or spec.loader is None:
            return spec
        if target is not None or name in sys.modules:
            registry.module_gone(name)  # a reload: the old code is gone
            _objects.pop(name, None)
        _wrap_loader(name, spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


def _find_elsewhere(
    me: object, name: str, path: Sequence[str] | None, target: ModuleType | None
) -> ModuleSpec | None:
    for finder in list(sys.meta_path):
        if finder is me:
            continue
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec: ModuleSpec | None = find(name, path, target)
        if spec is not None:
            return spec
    return None


def _wrap_loader(name: str, loader: Any) -> None:
    get_code = getattr(loader, "get_code", None)
    exec_module = getattr(loader, "exec_module", None)
    if get_code is None or exec_module is None:
        return  # an extension module or a loader we cannot see into: no Python code
    seen: list[CodeType] = []

    # Arming probes on the module's code is pykprobes' work (kprobe_busy: what it runs of a
    # probed library records nothing); the module's body is the program's.
    def notified_get_code(fullname: str) -> CodeType | None:
        code = get_code(fullname)
        if isinstance(code, CodeType) and fullname == name:
            seen.append(code)
            with kprobe_busy():
                _notify_coming(name)
                return registry.module_code_loaded(name, code)
        return code  # type: ignore[no-any-return]

    def notified_exec_module(module: ModuleType) -> None:
        try:
            exec_module(module)
        finally:
            if seen:
                with kprobe_busy():
                    registry.module_executed(name, seen[-1])
            if name in registry.probed_modules():
                _objects[name] = module

    loader.get_code = notified_get_code
    loader.exec_module = notified_exec_module


_notifier = ModuleNotifier()


def install() -> None:
    if _notifier not in sys.meta_path:
        sys.meta_path.insert(0, _notifier)


def uninstall() -> None:
    while _notifier in sys.meta_path:
        sys.meta_path.remove(_notifier)

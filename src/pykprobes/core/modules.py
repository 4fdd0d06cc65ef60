"""The module notifier (the kernel's `kprobes_module_callback` and its notifier chain).

A probe on a module that is not imported yet is *pending*: it waits in the table's pending
list and is armed on the module's code when the code comes, before its body runs
(`loaded`). After the body ran (`executed`), the functions it made hold their code, and the
code states held by the module's constants are held by them. A module removed from
sys.modules, or reloaded, takes its probes with it: they are GONE (`gone`, the kernel's
kill_kprobe()).

The code comes through the import system (core/modwatch.py, whose listener this is), or
outside it: `pykprobes run` and the boot stage's main hook run the program's `__main__`
themselves, and hand its code over with `loading(name, code)`, the same two steps.

Clients hear of a module's code coming as kernel code registers on the module notifier
chain (`register_module_notifier`): `notifier(name)` is called when a watched module's code
is loaded for an import (MODULE_STATE_COMING: a first import, a reload, or an import again
after the module left sys.modules), before its body runs and before the pending probes are
armed on that code. A probe it registers on that module then waits for this very code, even
in a reload (the kernel's trace_kprobe_module_callback() re-registers the events of a module
that comes back this way).

The room is handed the table (core/table.py). The table is never locked while importing,
and nothing here is called with a lock of the import system held.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import CodeType, ModuleType
from typing import TYPE_CHECKING

from pykprobes.core import codestate, resolve
from pykprobes.core.blacklist import blacklist_reason
from pykprobes.core.guard import kprobe_busy, warn
from pykprobes.core.kprobe_addr import check_offset, check_offset_value, refuse_class
from pykprobes.core.modwatch import ImportWatch
from pykprobes.core.probe import KPROBE_FLAG_GONE, Kprobe
from pykprobes.errors import einval

if TYPE_CHECKING:
    from pykprobes.core.codestate import CodeState, Mechanisms
    from pykprobes.core.table import KprobeTable


class NoAddr:
    """The address of a pending probe: its offset, no code yet."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset

    hexid = "0" * 16


class PendingSite:
    """Stands in for the site of a probe whose module is not imported yet."""

    __slots__ = ("addr", "symbol")

    def __init__(self, symbol: str, offset: int) -> None:
        self.symbol = symbol
        self.addr = NoAddr(offset)


class ModuleNotifier:
    """The table's module notifier: pending probes, and the modules' code coming, run and
    going."""

    def __init__(self, table: KprobeTable) -> None:
        self.table = table
        self.imports = ImportWatch(self)
        #: The module notifier chain: called with the name of a watched module whose code
        #: comes.
        self.notifiers: list[Callable[[str], None]] = []
        #: realpath -> module name, for source files whose code will be handed over by
        #: `loaded()` rather than imported under a name sys.path tells (core/lines.py).
        self.expected_files: dict[str, str] = {}
        #: id(module code the import system runs) -> its module's Mechanisms.installs when
        #: `loaded` handed it over (module_executed).
        self.installs_at_load: dict[int, int] = {}

    # ------------------------------------------------------------------ the chain

    def register_module_notifier(self, notifier: Callable[[str], None]) -> None:
        if notifier not in self.notifiers:
            self.notifiers.append(notifier)

    def unregister_module_notifier(self, notifier: Callable[[str], None]) -> None:
        if notifier in self.notifiers:
            self.notifiers.remove(notifier)

    # ------------------------------------------------------------------ watching

    def install(self) -> None:
        self.imports.install()

    def watch(self, name: str, module: ModuleType | None = None) -> None:
        """Watch `name`'s imports, and its module object (a reload or a removal marks its
        probes GONE)."""
        self.imports.watch(name, module)

    def expect(self, name: str, path: str | None = None) -> None:
        """Declare that `name`'s code will be handed over with `loaded()` (even if a module
        of that name is in sys.modules now): probes on it wait for that. `path`, the source
        file, lets line targets in it wait too (core/lines.py)."""
        with self.table.lock:
            self.table.expected.add(name)
            if path is not None:
                self.expected_files[os.path.realpath(path)] = name

    # ------------------------------------------------------------------ pending probes

    def add_pending(self, p: Kprobe, module: str, qualname: str) -> None:
        """`p` waits for `module` (table lock held)."""
        self.table.pending.setdefault(module, []).append((p, qualname))
        p._site = PendingSite(f"{module}:{qualname}", p.offset)

    def register_pending(self, p: Kprobe, module: str, qualname: str) -> None:
        with self.table.lock:
            self.add_pending(p, module, qualname)
        self.watch(module)

    def remove_pending(self, p: Kprobe, site: PendingSite) -> None:
        """Unregister a pending probe (table lock held)."""
        pending = self.table.pending
        module = site.symbol.partition(":")[0]
        entries = [e for e in pending.get(module, []) if e[0] is not p]
        if entries:
            pending[module] = entries
        else:
            pending.pop(module, None)
        p._site = None

    def pending_modules(self) -> set[str]:
        with self.table.lock:
            return set(self.table.pending)

    def probed_modules(self) -> set[str]:
        with self.table.lock:
            return {s.module for s in self.table.states.values()} | set(self.table.pending)

    def check_waiting_target(self, module: str, qualname: str, offset: int) -> CodeType | None:
        """What a probe on `module:qualname+offset`, registered while the module is not
        imported, will meet at the import, found now from the module's compiled source
        (nothing imported, nothing run): the code it would sit in, or the KprobeError the
        import would report (`loaded`); None when there is no source to compile."""
        symbol = f"{module}:{qualname}"
        check_offset_value(offset, symbol)
        from pykprobes.core import lines  # lines imports tokenize: not at the boot stage

        code = lines.module_code_before_import(module, symbol)
        if code is None:
            return None
        target = resolve.resolve_in_code(module, code, qualname)
        refuse_class(target, module, qualname, offset)
        reason = blacklist_reason(module, target.code)
        if reason is not None:
            raise einval(f"{symbol}: cannot probe it ({reason})")
        check_offset(target.code, offset, symbol)
        return target.code

    # ------------------------------------------------------------------ the listener

    def coming(self, name: str) -> None:
        """MODULE_STATE_COMING: call the notifier chain (pykprobes' work: kprobe_busy)."""
        if not self.notifiers:
            return
        with kprobe_busy():
            # What the notifiers register on the module waits for the code now loaded,
            # though a reloaded module is still in sys.modules.
            self.expect(name)
            for notifier in list(self.notifiers):
                try:
                    notifier(name)
                except Exception as exc:  # noqa: BLE001 - never break the program's import
                    warn(f"pykprobes: a module notifier failed for {name}: {exc!r}")

    def loaded(self, name: str, code: CodeType) -> CodeType:
        """`name`'s code is about to run: arm its pending probes on the code objects it will
        create, and return the code to run (rewritten when the optimizer already handles a
        probe in it; early probes need that). Arming is pykprobes' work (kprobe_busy: what
        it runs of a probed library records nothing); the module's body is the program's."""
        with kprobe_busy():
            return self.module_code_loaded(name, code)

    def executed(self, name: str, code: CodeType) -> None:
        """`name`'s body ran from `code` (as given to `loaded`)."""
        with kprobe_busy():
            self.module_executed(name, code)

    def gone(self, name: str) -> None:
        self.module_gone(name)

    def probed(self, name: str) -> bool:
        return name in self.probed_modules()

    def loading(self, name: str, code: CodeType) -> Loading:
        """A module's code run outside the import system (`__main__` by `pykprobes run` or
        the main hook): its probes are armed now, as an import arms them (see Loading)."""
        return Loading(self, name, code)

    # ------------------------------------------------------------------ the work

    def module_code_loaded(self, module: str, code: CodeType) -> CodeType:
        table = self.table
        early = table.early
        if early.is_early() and module in table.pending:
            early.load_optimizer()  # before the lock: it imports
        m = table.mechanisms()
        # `code` was just loaded: no function holds any of its code objects yet.
        with table.lock, codestate.unheld(m):
            table.expected.discard(module)
            unresolved: list[tuple[Kprobe, str]] = []
            for p, qualname in table.pending.pop(module, []):
                if p.flags & KPROBE_FLAG_GONE:
                    unresolved.append((p, qualname))
                    continue
                pending_site, p._site = p._site, None
                try:
                    target = resolve.resolve_in_code(module, code, qualname)
                    refuse_class(target, module, qualname, p.offset)
                    table.register_aggr_kprobe(p, target, f"{module}:{qualname}", m)
                except Exception as exc:  # noqa: BLE001 - never break the program's import
                    # It stays registered, GONE, as a kernel probe whose text went away.
                    p._site = pending_site
                    p.flags |= KPROBE_FLAG_GONE
                    unresolved.append((p, qualname))
                    warn(f"pykprobes: probe on {module}:{qualname} could not be armed when "
                         f"{module} was imported: {exc}")
            if unresolved:
                table.pending[module] = unresolved
            root = table.states.get(id(code))
            if root is None:
                return code
            table.executing.add(id(code))
            self.installs_at_load[id(code)] = m.installs.get(module, 0)
            return root.current.code

    def module_executed(self, module: str, code: CodeType) -> None:
        """After the body ran: the functions it created now hold their code, so code states
        whose holder was the module's (or a class body's) constants are held by functions."""
        table = self.table
        m = table.mechanisms()
        with table.lock, codestate.switching(m):
            table.executing.discard(id(code))
            # No version installed while the body ran: the functions it made hold the
            # versions it was given, the current ones (no heap walk to adopt them).
            adopt = self.installs_at_load.pop(id(code), None) != m.installs.get(module, 0)
            # The module is in sys.modules now, whatever it was when its code was rewritten.
            for state in table.states.values():
                if state.module == module:
                    codestate.share_names(state, m)
            root = table.states.get(id(code))
            if root is None:
                return
            self._detach_executed(root, m, adopt)

    def _detach_executed(self, state: CodeState, m: Mechanisms, adopt: bool) -> None:
        # Module and class bodies run once: their children are held by objects from now on.
        for index, child in list(state.children.items()):
            if _runs_once(child.original):
                self._detach_executed(child, m, adopt)
            child.parent = None
            child.const_index = None
            del state.children[index]
            if adopt:
                codestate.adopt_holders(child, m)
        # Without sites or children, nothing maps its versions back any more, nor waits for
        # them to retire.
        if not state.sites and not state.children and \
                self.table.states.pop(id(state.original), None) is state:
            # The original too: the optimizer may have forgotten it as a retired version
            # already (the body no longer ran it) while a rewritten copy is current.
            for version in (state.current, *state.retired):
                m.versions.pop(id(version.code), None)
            if m.versions.get(id(state.original)) is state:
                del m.versions[id(state.original)]
            codestate.set_retired(state, [], m)

    def module_gone(self, module: str) -> None:
        """The module was removed or reloaded: its probes are GONE (kill_kprobe)."""
        table = self.table
        m = table.mechanisms()
        with table.lock, codestate.switching(m):
            for state in list(table.states.values()):
                if state.module != module:
                    continue
                for site in list(state.sites.values()):
                    for p in site.probes:
                        p.flags |= KPROBE_FLAG_GONE
                    site.optimized = False
                    table.arm_kprobe(site, state, m)

    def check_gone(self) -> None:
        """Mark GONE the probes of modules that left sys.modules since they were probed."""
        for module in self.imports.vanished():
            self.module_gone(module)

    def module_object(self, name: str) -> ModuleType | None:
        """The imported module `name`, unless its code is expected (`expect`)."""
        return None if name in self.table.expected else sys.modules.get(name)


class Loading:
    """`with modules.loading(name, code) as run: exec(run, namespace)`: the code to run is
    `run` (rewritten when a probe in it is optimized), and the module's functions are
    handed over when the block ends (`executed()`, which a caller running the body some
    other way calls itself), as an import does it."""

    __slots__ = ("_modules", "name", "original", "run")

    def __init__(self, modules: ModuleNotifier, name: str, code: CodeType) -> None:
        self._modules = modules
        self.name = name
        #: The code the program compiled (-m: the import may have rewritten `code`).
        self.original = modules.table.original(code)
        self.run = modules.loaded(name, self.original)
        # Its caller may run another code than `run` (the main hook, in a multiprocessing
        # child, runs the original: boot/mainhook.py): the holders are adopted after it.
        modules.installs_at_load.pop(id(self.original), None)

    def executed(self) -> None:
        self._modules.executed(self.name, self.original)

    def __enter__(self) -> CodeType:
        return self.run

    def __exit__(self, *exc_info: object) -> None:
        self.executed()


def _runs_once(code: CodeType) -> bool:
    return not (code.co_flags & 0x01)  # not CO_OPTIMIZED: a module or class body

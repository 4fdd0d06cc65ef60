"""Where a probe goes, and whether it may go there (the kernel's `kprobe_addr()` and
`check_kprobe_address_safe()`).

Everything here runs outside the table's lock: resolving a symbol may import. The table
(core/table.py) is handed in for what resolution needs of it: the modules whose code will be
handed over outside the import system (`expected`) and the map from a running version back
to the code the program compiled (`original`).
"""

from __future__ import annotations

from types import CodeType, FunctionType, MethodType
from typing import TYPE_CHECKING, Any

from pykprobes import insn
from pykprobes.core import resolve
from pykprobes.core.address import ProbeAddress, is_entry
from pykprobes.core.blacklist import blacklist_reason
from pykprobes.errors import einval, enoent

if TYPE_CHECKING:
    from pykprobes.core.probe import Kprobe
    from pykprobes.core.table import KprobeTable


def code_from_addr(table: KprobeTable, addr: Any) -> tuple[CodeType, str | None]:
    """The original code `addr` names, and the module name a function gives."""
    if isinstance(addr, ProbeAddress):
        return table.original(addr.code), None
    obj = addr
    if isinstance(obj, (staticmethod, classmethod, MethodType)):
        obj = obj.__func__
    if isinstance(obj, FunctionType):
        return table.original(obj.__code__), obj.__module__ or "?"
    if isinstance(obj, CodeType):
        return table.original(obj), None
    raise einval(f"addr must be a function, a code object or a ProbeAddress, not "
                 f"{type(addr).__name__}")


def target_from_addr(table: KprobeTable, addr: Any) -> resolve.Target:
    """The target of `addr`, with the code objects holding it when it is nested code in
    an imported module (resolve.holder_chain): without them, functions made from its
    parent's constants after the optimizer ran would run the original code, unprobed."""
    code, module = code_from_addr(table, addr)
    mod = resolve.module_of_file(code.co_filename)
    if module is None:
        module = mod.__name__ if mod is not None else code.co_filename
    target = resolve.Target(module, code)
    return target if mod is None else resolve.holder_chain(target, mod, table.original)


def check_offset_value(offset: object, symbol: str) -> int:
    """What can be checked of an offset without its code (a probe waiting for its module
    is checked this far at registration, and the rest at the import)."""
    if not isinstance(offset, int) or offset < 0:
        raise einval(f"{symbol}: offset {offset!r} must be a non-negative int")
    return offset


def check_offset(code: CodeType, offset: int, symbol: str) -> int:
    """The instruction start `offset` names in `code` (0 anywhere in the prologue: the
    function's entry); EINVAL past the end or off an instruction boundary."""
    check_offset_value(offset, symbol)
    try:
        if is_entry(code, offset):
            return 0  # anywhere in the prologue is the function's entry
    except ValueError as exc:
        raise einval(f"{symbol}: {exc}") from exc
    ins = insn.insn_at(code, offset)
    if ins is None:
        if offset >= len(code.co_code):
            raise einval(f"{symbol}+{offset}: offset past the end of the code "
                         f"({len(code.co_code)} bytes)")
        raise einval(f"{symbol}+{offset}: offset is not on an instruction boundary")
    # The offset `dis` shows for an instruction with EXTENDED_ARG prefixes is its opcode's:
    # the probe is at the instruction, whose address is its first prefix.
    return ins.start


def check_kprobe_address_safe(module: str, code: CodeType | None, symbol: str) -> None:
    """EINVAL when the blacklist (core/blacklist.py) forbids `module` or `code`."""
    reason = blacklist_reason(module, code)
    if reason is not None:
        what = module if code is None else "it"
        raise einval(f"{symbol}: cannot probe {what} ({reason})")


def refuse_class(target: resolve.Target, module: str, qualname: str, offset: int) -> None:
    """A class named by a probe waiting for its module is refused as an imported module's
    class is (resolve_imported): its body runs once. A line of the body is another
    matter (a line target in a file not imported yet): only the body's entry is the
    class's name."""
    if qualname != resolve.MODULE_CODE and resolve.is_class_body(target.code) and \
            isinstance(offset, int) and is_entry(target.code, offset):
        raise einval(f"{module}:{qualname} is a class: probe one of its methods")


def kprobe_addr(table: KprobeTable, p: Kprobe) -> tuple[resolve.Target, str] | None:
    """Check `p` and find its target (the kernel's kprobe_addr()), outside the lock
    (resolving may import): the target and its `module:qualname`, or None when its module
    is not imported yet (`p` then waits for it: the caller registers it pending). Raises
    KprobeError. The caller has checked that `p` is not registered and names one place."""
    if p.symbol_name is not None:
        module, qualname = resolve.split_symbol(p.symbol_name)
        check_kprobe_address_safe(module, None, p.symbol_name)
        mod = table.modules.module_object(module)
        if mod is None:
            if module not in table.expected and not resolve.module_exists(module):
                raise enoent(f"{p.symbol_name}: no module named {module!r}")
            check_offset_value(p.offset, f"{module}:{qualname}")
            return None
        target = resolve.holder_chain(
            resolve.resolve_imported(mod, qualname, table.original), mod, table.original)
        return target, f"{module}:{qualname}"
    target = target_from_addr(table, p.addr)
    symbol = f"{target.module}:{target.code.co_qualname}"
    check_kprobe_address_safe(target.module, target.code, symbol)
    return target, symbol

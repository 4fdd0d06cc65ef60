"""Reads of the program's objects that run none of the program's code (docs/architecture.md,
rule 9).

A fetch runs inside the probed program, in the middle of its work: it must not run a property,
a descriptor's `__get__`, `__getattr__`, a `__getattribute__` override, `__hash__`, `__eq__`,
`__len__`, `__bool__` or `__repr__` of the program, because any of them may change the
program's state (count, cache, log, take a lock). Python's own tools all do: `getattr` runs
them all, `object.__getattribute__` runs properties and descriptors, `isinstance` reads a
`__class__` property, `x in (a, b)` runs `__eq__`, `hash(cls)` a metaclass's `__hash__`.
So this module only ever:

* reads a class's own namespace through the C getset `type.__dict__["__dict__"]` (and its
  `__mro__`, `__qualname__`, `__module__` the same way), never by attribute access on the
  class, which would go through its metaclass;
* tests types by identity (`type(x) is dict`) or with `issubclass(type(x), <builtin type>)`,
  whose metaclass is `type`: both are C code that reads the type's layout;
* calls C methods of exact builtin types through the type (`dict.get(d, k)`, never `d.get`).

`get_attr(obj, name)` first looks `name` up in the MRO of `type(obj)` as the interpreter does
(`_PyType_Lookup`) and decides from what it finds: nothing, or plain class data, or a C
function/method descriptor -> `object.__getattribute__(obj, name)`, which under that condition
reads the instance's own storage (inline values or `__dict__`) and falls back to the class
value, running only C code; a `__slots__` member -> its C getter; a C getset of a builtin type
-> its getter (but for a few that call back into Python or warn: `_UNSAFE_GETSETS`); a property
or any other data descriptor of the program -> FAULT; any other non-data descriptor of the
program (`functools.cached_property`) -> the instance `__dict__` entry or FAULT. A class
overriding `__getattribute__` or defining `__getattr__` is read the same way: its own state,
never its hooks (so a proxy class shows its own attributes, not those it forwards to).

`get_item(obj, key)` reads exact `list`/`tuple`/`str`/`bytes` items by int index and exact
`dict` entries (and those of the stdlib's `OrderedDict`/`defaultdict`/`Counter`, read as
dicts: no `__missing__`, no default factory) by a key of a builtin type. A dict lookup
compares the key with every stored key of the same hash, and a stored key of a program class
would run its `__eq__`: so the dict's key types are checked first, by identity (~20 ns a
key), and a dict holding another key type, or more than DICT_SCAN_CAP keys, is a FAULT.

`describe(obj)` is what a value without a type records; `capped_repr(obj, limit)` is the one
function here that runs the program's code, for the explicit `:repr` type.

Class namespaces are read as dicts (the dict a class's `__dict__` proxy wraps, found once per
class with gc.get_referents) and the namespaces of a class's MRO are cached by class, checked
against its current `__mro__` tuple on every use, so a lookup costs a few dict probes and
still sees an attribute added to a class at any time.
"""

from __future__ import annotations

import gc
import reprlib
from collections import Counter, OrderedDict, defaultdict, deque
from itertools import islice
from types import (
    BuiltinFunctionType,
    ClassMethodDescriptorType,
    FunctionType,
    GetSetDescriptorType,
    MemberDescriptorType,
    MethodDescriptorType,
    MethodType,
    ModuleType,
    WrapperDescriptorType,
)
from typing import Any, Final

__all__ = [
    "DICT_SCAN_CAP",
    "FAULT",
    "REPR_CAP",
    "STR_CAP",
    "Fault",
    "Opaque",
    "capped_repr",
    "class_lookup",
    "describe",
    "get_attr",
    "get_item",
    "int_text",
    "type_qualname",
]


class Fault:
    """The type of FAULT, the value recorded for what could not be fetched (kernel "(fault)")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "(fault)"

    __str__ = __repr__

    def __reduce__(self) -> str:
        # Pickled and copied as the module global: FAULT stays a singleton (`is` works).
        return "FAULT"


#: The marker for a value that could not be fetched, printed `(fault)`.
FAULT: Final = Fault()


class Opaque(str):
    """Text recorded in place of a value (`<Foo at 0x...>`, a capped repr, a type name, a
    `module:qualname`): a description, not a string of the program, so its repr is the text
    itself and a formatter shows it unquoted. It is a str for filters and JSON."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


#: A str or bytes value is recorded up to this many characters (bytes), then "...".
STR_CAP: Final = 256
#: `:repr` text is cut at this many characters, then "...".
REPR_CAP: Final = 256
#: A dict with more keys than this is not subscripted (see the module docstring).
DICT_SCAN_CAP: Final = 128

_MISSING: Final = object()
_NoneType: Final = type(None)

# The C getters of the type object's own fields, taken from `type` itself: reading them as
# `cls.__mro__` would go through the metaclass, which may override them (a `__qualname__`
# property on a metaclass is legal).
_type_mro: Final = type.__dict__["__mro__"].__get__
_type_ns: Final = type.__dict__["__dict__"].__get__  # a read-only proxy of the class's namespace
_type_qualname: Final = type.__dict__["__qualname__"].__get__
_type_module: Final = type.__dict__["__module__"].__get__
# PyObject_GenericGetAttr itself, whatever the object's class overrides.
_generic_getattr: Final = object.__getattribute__
_member_get: Final = MemberDescriptorType.__get__
_getset_get: Final = GetSetDescriptorType.__get__
_descr_objclass: Final = GetSetDescriptorType.__dict__["__objclass__"].__get__
_cmdescr_get: Final = ClassMethodDescriptorType.__get__
_method_descr_get: Final = MethodDescriptorType.__get__
_wrapper_descr_get: Final = WrapperDescriptorType.__get__
_sm_func: Final = staticmethod.__dict__["__func__"].__get__
_cm_func: Final = classmethod.__dict__["__func__"].__get__
_func_qualname: Final = FunctionType.__dict__["__qualname__"].__get__
_module_dict: Final[Any] = _type_ns(ModuleType)["__dict__"].__get__
_dict_get: Final[Any] = dict.get
_dict_iter: Final[Any] = dict.__iter__
# The base value of an instance of a subclass of a builtin (an IntEnum member, a str
# subclass): the builtin's C method, never the subclass's override.
_int_value: Final[Any] = int.__int__
_float_value: Final[Any] = float.__float__
_str_value: Final[Any] = str.__str__
_bytes_value: Final[Any] = bytes.__bytes__


_only_str: Final = frozenset((str,)).issuperset


def _str_keys(mapping: Any) -> bool:
    """Whether every key of a dict (or a class's namespace proxy) is an exact str: a lookup
    by a str then compares it with str keys only. A key of another type whose hash equals
    the name's would have its `__eq__` run by the lookup (issue 16). (C code throughout:
    `issuperset` consumes the `map` without building a set.)"""
    try:
        return _only_str(map(type, mapping))
    except RuntimeError:  # changed size while read by another thread
        return False


class _UnsafeNamespace:
    """Stands for a class namespace holding a key that is not an exact str (legal, if odd:
    `type("X", (), {obj: 1})`): a lookup there could run that key's `__eq__`, so every
    name is found there, as FAULT."""

    __slots__ = ()

    def __contains__(self, name: object) -> bool:
        return True

    def __getitem__(self, name: object) -> Any:
        return FAULT

    def get(self, name: object, default: Any = None) -> Any:
        return FAULT


_UNSAFE_NAMESPACE: Final = _UnsafeNamespace()


def _namespace(klass: type) -> Any:
    """The dict of a class's namespace: the one object its `__dict__` proxy wraps (a class's
    namespace dict is made once, with the class, and never replaced); `_UNSAFE_NAMESPACE`
    if it has a key that is not a str (checked when the class's MRO is cached)."""
    proxy = _type_ns(klass)
    referents = gc.get_referents(proxy)
    namespace = referents[0] if len(referents) == 1 and type(referents[0]) is dict else proxy
    return namespace if _str_keys(namespace) else _UNSAFE_NAMESPACE


# The namespaces of the MRO of the classes looked up lately, by id(class): (class, its MRO
# tuple, their namespace dicts). The MRO tuple is checked on every use (assigning
# `__bases__` makes a new one); a class is checked by identity, so a dead class's id reused
# is a miss. Bounded: cleared when full (the classes it holds stay alive until then).
_MRO_CACHE: dict[int, tuple[type, tuple[type, ...], tuple[Any, ...], Any]] = {}
_MRO_CACHE_MAX: Final = 512


def _namespaces(tp: type) -> tuple[Any, ...]:
    return _mro_entry(tp)[2]


def _mro_entry(tp: type) -> tuple[type, tuple[type, ...], tuple[Any, ...], Any]:
    """`(tp, its MRO, their namespaces, the instances' __dict__ descriptor or None)`."""
    # `tp.__mro__` is type's own C getter when the metaclass is `type` itself (and cheaper
    # than calling the getter: a probe pays for this on every attribute it reads).
    mro = tp.__mro__ if type(tp) is type else _type_mro(tp)
    entry = _MRO_CACHE.get(id(tp))
    if entry is not None and entry[0] is tp and entry[1] is mro:
        return entry
    namespaces = tuple([_namespace(klass) for klass in mro])
    # The C descriptor that stores the instances' `__dict__` (the first `__dict__` of the
    # MRO, as the interpreter finds it), or None: a program's `__dict__` property is not it.
    descr = next((ns.get("__dict__") for ns in namespaces if "__dict__" in ns), None)
    if type(descr) is not GetSetDescriptorType and type(descr) is not MemberDescriptorType:
        descr = None
    if len(_MRO_CACHE) >= _MRO_CACHE_MAX:
        _MRO_CACHE.clear()
    entry = _MRO_CACHE[id(tp)] = (tp, mro, namespaces, descr)
    return entry


def _lookup(tp: type, name: str) -> Any:
    """`name` in the namespaces of `tp`'s MRO, first found (the interpreter's _PyType_Lookup),
    or _MISSING; no descriptor is called, the metaclass is not consulted."""
    for namespace in _namespaces(tp):
        if name in namespace:
            try:
                return namespace[name]
            except KeyError:  # deleted by another thread meanwhile
                return _MISSING
    return _MISSING


def _type_has(tp: type, name: str) -> bool:
    return _lookup(tp, name) is not _MISSING


def _is_data_descriptor_type(tp: type) -> bool:
    """Whether instances of `tp` are data descriptors (a property...): `__set__`/`__delete__`."""
    return _lookup(tp, "__set__") is not _MISSING or _lookup(tp, "__delete__") is not _MISSING


def class_lookup(tp: type, name: str, default: Any = None) -> Any:
    """The raw entry `name` of the first class in `tp`'s MRO that defines it (no descriptor
    called, the metaclass not consulted), or `default`."""
    value = _lookup(tp, name)
    return default if value is _MISSING else value


# Types of class attributes that are plain data: no __get__ (checked below, not assumed).
_PLAIN_IDS: Final = frozenset(
    id(t)
    for t in (
        int,
        float,
        bool,
        str,
        bytes,
        complex,
        tuple,
        list,
        dict,
        set,
        frozenset,
        _NoneType,
        type,
        BuiltinFunctionType,
    )
    if not _type_has(t, "__get__")
)
# Non-data descriptors whose __get__ is C code (functions bind, method descriptors bind or
# return themselves): `object.__getattribute__` may call it.
_SAFE_NONDATA_IDS: Final = frozenset(
    id(t)
    for t in (
        FunctionType,
        MethodDescriptorType,
        WrapperDescriptorType,
        ClassMethodDescriptorType,
        staticmethod,
    )
)
# C getsets that call back into Python code or warn: `type.__doc__` and `__annotations__`
# call a descriptor found in the class dict, `__isabstractmethod__` reads an attribute of the
# wrapped function, `frame.f_locals` syncs the frame's locals dict before 3.13 (PEP 667),
# `code.co_lnotab` warns (DeprecationWarning, 3.12), `__annotate__` may run (3.14).
_UNSAFE_GETSETS: Final = frozenset(
    ("__doc__", "__annotations__", "__annotate__", "__isabstractmethod__", "f_locals", "co_lnotab")
)
# Getsets of types from these modules are interpreter C code that reads the object.
_GETSET_MODULES: Final = frozenset(("builtins", "datetime"))


def _getset_ok(descr: Any, name: str) -> bool:
    """Whether calling the C getset `descr` (found as `name`) runs nothing but a read."""
    if name == "__dict__" or name == "__weakref__":
        # The instance dict / weakref getters every class with a dict gets from type_new().
        return True
    if name in _UNSAFE_GETSETS:
        return False
    try:
        module = _type_module(_descr_objclass(descr))
    except Exception:  # noqa: BLE001 - a heap type without __module__
        return False
    return type(module) is str and module in _GETSET_MODULES


def _read_generic(obj: object, name: str, tp: type, descr: Any) -> Any:
    """`object.__getattribute__(obj, name)`: only called once the MRO lookup found nothing
    there that would run program code (a data descriptor or a program's `__get__`), and
    when the instance's `__dict__` (found by `descr`), which it looks in first, has str
    keys only."""
    if descr is not None:
        instance_dict = _dict_by(descr, obj, tp)
        if instance_dict is not None and not _str_keys(instance_dict):
            return FAULT
    try:
        return _generic_getattr(obj, name)
    except Exception:  # noqa: BLE001 - AttributeError, or a C getter's own error
        return FAULT


def _dict_by(descr: Any, obj: object, tp: type) -> Any:
    """The instance `__dict__` read with its C descriptor (a dict), or None."""
    try:
        if type(descr) is GetSetDescriptorType:
            value = _getset_get(descr, obj, tp)
        else:
            value = _member_get(descr, obj, tp)
    except Exception:  # noqa: BLE001
        return None
    return value if issubclass(type(value), dict) else None


def _instance_dict(obj: object) -> dict[str, Any] | None:
    """The instance `__dict__` through the C descriptor that stores it (skipping a `__dict__`
    property of the program), or None. An object whose attributes are stored inline (3.11+)
    gets a dict object made for it: a cost, invisible to the program."""
    tp = type(obj)
    descr = _mro_entry(tp)[3]
    return None if descr is None else _dict_by(descr, obj, tp)


def get_attr(obj: Any, name: str) -> Any:
    """`obj.name` as the program would see it, or FAULT where seeing it would run code of the
    program: an instance's own `__dict__` entry or `__slots__` member, class data, module
    globals, a class's own attributes; never a property, a descriptor's `__get__`,
    `__getattr__` or a `__getattribute__` override (see the module docstring)."""
    tp = type(obj)
    if issubclass(tp, type):
        return _get_class_attr(obj, name)
    # _lookup(tp, name), inline: this is the path of every `.attr` of a fetch.
    _, _, namespaces, descr = _mro_entry(tp)
    for namespace in namespaces:
        if name in namespace:
            attr = namespace.get(name, _MISSING)
            break
    else:
        # Not a class attribute: the instance's own storage (its __dict__, read by us once
        # its keys are all str; else its slots), or nothing.
        if descr is None:
            return _read_generic(obj, name, tp, None)
        try:
            instance_dict = _getset_get(descr, obj, tp) if type(
                descr) is GetSetDescriptorType else _member_get(descr, obj, tp)
            if _only_str(map(type, instance_dict)):
                return _dict_get(instance_dict, name, FAULT)
        except Exception:  # noqa: BLE001 - not a dict, or changed size meanwhile
            pass
        return FAULT
    if attr is _MISSING:
        return _read_generic(obj, name, tp, descr)
    if attr is FAULT:
        return FAULT  # a class namespace that cannot be read safely (_UnsafeNamespace)
    atype = type(attr)
    if id(atype) in _PLAIN_IDS:
        return _read_generic(obj, name, tp, descr)
    if atype is MemberDescriptorType:
        # A __slots__ member: a C read of the instance's slot.
        try:
            return _member_get(attr, obj, tp)
        except Exception:  # noqa: BLE001 - an unset slot
            return FAULT
    if atype is GetSetDescriptorType:
        if not _getset_ok(attr, name):
            return FAULT
        try:
            return _getset_get(attr, obj, tp)
        except Exception:  # noqa: BLE001
            return FAULT
    if not _type_has(atype, "__get__"):
        return _read_generic(obj, name, tp, descr)  # plain class data of a program type
    if _is_data_descriptor_type(atype):
        return FAULT  # a property, or a data descriptor of the program
    if id(atype) in _SAFE_NONDATA_IDS or (
        atype is classmethod and type(_cm_func(attr)) is FunctionType
    ):
        return _read_generic(obj, name, tp, descr)
    # A non-data descriptor of the program (functools.cached_property): the instance dict wins
    # over it, and is all that can be read.
    instance_dict = _instance_dict(obj)
    if instance_dict is None:
        return FAULT
    return _dict_get(instance_dict, name, FAULT)


def _get_class_attr(cls: type, name: str) -> Any:
    """`cls.name` for a class (type_getattro's order: data descriptors of the metaclass, then
    the class's MRO, then the metaclass's other attributes), or FAULT."""
    meta = type(cls)
    meta_attr = _lookup(meta, name)
    if meta_attr is not _MISSING:
        mtype = type(meta_attr)
        try:
            if mtype is MemberDescriptorType:
                return _member_get(meta_attr, cls, meta)
            if mtype is GetSetDescriptorType:
                return _getset_get(meta_attr, cls, meta) if _getset_ok(meta_attr, name) else FAULT
        except Exception:  # noqa: BLE001
            return FAULT
        if id(mtype) not in _PLAIN_IDS and _is_data_descriptor_type(mtype):
            return FAULT  # a property of the metaclass
    attr = _lookup(cls, name)
    if attr is not _MISSING:
        atype = type(attr)
        if id(atype) in _PLAIN_IDS or not _type_has(atype, "__get__"):
            return attr
        if (
            atype is FunctionType
            or atype is property
            or atype is MemberDescriptorType
            or atype is GetSetDescriptorType
            or atype is MethodDescriptorType
            or atype is WrapperDescriptorType
        ):
            return attr  # their __get__(None, cls) returns themselves
        if atype is staticmethod:
            return _sm_func(attr)
        if atype is classmethod:
            func = _cm_func(attr)
            return MethodType(func, cls) if type(func) is FunctionType else FAULT
        if atype is ClassMethodDescriptorType:
            try:
                return _cmdescr_get(attr, None, cls)
            except Exception:  # noqa: BLE001
                return FAULT
        return FAULT  # a descriptor of the program
    if meta_attr is _MISSING:
        return FAULT
    mtype = type(meta_attr)
    if id(mtype) in _PLAIN_IDS or not _type_has(mtype, "__get__"):
        return meta_attr
    if mtype is FunctionType:
        return MethodType(meta_attr, cls)  # a method of the metaclass, bound to the class
    try:
        if mtype is MethodDescriptorType:
            return _method_descr_get(meta_attr, cls, meta)
        if mtype is WrapperDescriptorType:
            return _wrapper_descr_get(meta_attr, cls, meta)
    except Exception:  # noqa: BLE001
        return FAULT
    return FAULT


# Dict types whose storage is a dict's, read with dict's own C methods (their __getitem__ and
# __missing__ are never called: a missing key is a FAULT, not a default).
_DICT_IDS: Final = frozenset(id(t) for t in (dict, OrderedDict, defaultdict, Counter))


def _safe_key(key: object) -> bool:
    kt = type(key)
    return kt is str or kt is int or kt is bytes or key is None or kt is bool or kt is float


def get_item(obj: Any, key: Any) -> Any:
    """`obj[key]` for an exact list, tuple, str or bytes (int index, negative allowed) and for
    a dict whose keys are all of builtin types, with `key` of a builtin type (str, int, bytes,
    None, bool, float); FAULT otherwise or when the key/index is not there."""
    tp = type(obj)
    if tp is list or tp is tuple or tp is str or tp is bytes:
        kt = type(key)
        if kt is not int and kt is not bool:
            return FAULT
        try:
            return obj[key]
        except IndexError:
            return FAULT
    if tp is dict or id(tp) in _DICT_IDS:
        if not _safe_key(key) or len(obj) > DICT_SCAN_CAP:
            return FAULT
        # Every stored key of a builtin type, so the lookup's == calls are all C code. (A
        # plain loop: faster than all(map(...)) for the small dicts this is for.)
        for stored in _dict_iter(obj):
            kt = type(stored)
            if not (
                kt is str or kt is int or kt is bytes or stored is None or kt is bool or kt is float
            ):
                return FAULT
        return _dict_get(obj, key, FAULT)
    return FAULT


def _cap_str(text: str, cap: int = STR_CAP) -> str:
    return text if len(text) <= cap else text[:cap] + "..."


def _cap_bytes(data: bytes, cap: int = STR_CAP) -> bytes:
    return data if len(data) <= cap else data[:cap] + b"..."


#: Ints of at most this many bits are shown in decimal: 2**14284 < 10**4300, CPython's
#: default `sys.int_max_str_digits` (3.11+, gh-95778), a bound on the quadratic cost of a
#: decimal conversion that holds whatever limit the program set (0: none).
DECIMAL_BITS: Final = 14284
#: An int too long for decimal is shown in hex, cut after this many digits ("...").
HEX_DIGITS_CAP: Final = 1024


def int_text(value: int, base16: bool = False) -> str:
    """An exact int as text, never raising and in bounded time: decimal (`base16`: `0x1f`,
    `-0x1f`); an int too long for decimal (over DECIMAL_BITS bits, or over the program's own
    `sys.set_int_max_str_digits()` limit) in hex, which has no limit, cut after HEX_DIGITS_CAP
    digits with "..."."""
    bits = int.bit_length(value)
    if not base16 and bits <= DECIMAL_BITS:
        try:
            return int.__repr__(value)
        except ValueError:  # the program lowered the int-to-str limit below this
            pass
    digits = (bits + 3) // 4
    if digits <= HEX_DIGITS_CAP:
        return int.__format__(value, "#x")
    sign = "-" if value < 0 else ""
    head = abs(value) >> (4 * (digits - HEX_DIGITS_CAP))
    return f"{sign}0x{int.__format__(head, 'x')}..."


def type_qualname(tp: type) -> str:
    """The `__qualname__` of a class as the interpreter stores it, whatever its metaclass says."""
    return _type_qualname(tp)  # type: ignore[no-any-return]


def describe(obj: Any) -> Any:
    """What a value without a type records: None, bool, int, float as themselves; str and bytes
    capped at STR_CAP; an instance of a subclass of one of these as its builtin value (an
    IntEnum member as its int); anything else as Opaque text `<Qualname at 0x...>` (modules
    `<module name>`, classes `<class Qualname>`, functions `<function Qualname at 0x...>`),
    without running any of the program's code. FAULT and Opaque pass through."""
    tp = type(obj)
    if tp is int or tp is str or tp is float or tp is bool or obj is None:
        return _cap_str(obj) if tp is str else obj
    if tp is bytes:
        return _cap_bytes(obj)
    if tp is Opaque or tp is Fault:
        return obj
    try:
        if issubclass(tp, int):
            return _int_value(obj)
        if issubclass(tp, float):
            return _float_value(obj)
        if issubclass(tp, str):
            return _cap_str(_str_value(obj))
        if issubclass(tp, bytes):
            return _cap_bytes(_bytes_value(obj))
        return Opaque(_opaque_text(obj, tp))
    except Exception:  # noqa: BLE001
        return FAULT


def _opaque_text(obj: object, tp: type) -> str:
    if tp is ModuleType:
        name = _dict_get(_module_dict(obj), "__name__")
        if type(name) is str:
            return f"<module {_cap_str(name)}>"
    elif issubclass(tp, type):
        return f"<class {_type_qualname(obj)}>"
    elif tp is FunctionType:
        qualname = _func_qualname(obj)
        if type(qualname) is str:
            return f"<function {qualname} at {id(obj):#x}>"
    return f"<{_type_qualname(tp)} at {id(obj):#x}>"


class _CappedRepr(reprlib.Repr):
    """reprlib's bounded repr (at most a few levels and items of builtin containers), with the
    program's `__repr__` for everything else, exceptions passed on (they make a FAULT) and
    builtin containers recognized by exact type, not by `type(x).__name__`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdeque = 16
        self.maxdict = self.maxset = self.maxfrozenset = 16
        self.maxstring = self.maxlong = self.maxother = max(limit, 8)

    def repr1(self, x: Any, level: int) -> str:
        name = _REPR_METHODS.get(id(type(x)))
        if name is not None:
            return getattr(self, name)(x, level)  # type: ignore[no-any-return]
        return self.repr_instance(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        text = repr(x)  # the program's __repr__: what the :repr type asks for
        return _cap_str(text, self.maxother) if type(text) is str else _cap_str(str.__str__(text))

    def repr_int(self, x: int, level: int) -> str:
        # repr() raises beyond the int-to-str limit, and costs quadratic time below it.
        return _cap_str(int_text(x), self.maxlong)

    # reprlib sorts a whole set or dict to show its first items (`_possibly_sorted`): time
    # in the size of the container, and the program's `__lt__` on every key. Shown here in
    # iteration order, reading no more items than are shown.
    def _shown(self, pieces: Any, n: int, level: int, maxitems: int) -> str:
        if level <= 0:
            return "..."
        shown = list(islice(pieces, maxitems))
        if n > maxitems:
            shown.append("...")
        return ", ".join(shown)

    def repr_set(self, x: Any, level: int) -> str:
        if not x:
            return "set()"
        items = (self.repr1(item, level - 1) for item in x)
        return "{" + self._shown(items, len(x), level, self.maxset) + "}"

    def repr_frozenset(self, x: Any, level: int) -> str:
        if not x:
            return "frozenset()"
        items = (self.repr1(item, level - 1) for item in x)
        return "frozenset({" + self._shown(items, len(x), level, self.maxfrozenset) + "})"

    def repr_dict(self, x: Any, level: int) -> str:
        if not x:
            return "{}"
        items = (f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in dict.items(x))
        return "{" + self._shown(items, len(x), level, self.maxdict) + "}"


_REPR_METHODS: Final = {
    id(t): "repr_" + t.__name__ for t in (tuple, list, dict, set, frozenset, deque, str, int)
}
_REPRS: dict[int, _CappedRepr] = {REPR_CAP: _CappedRepr(REPR_CAP)}


def capped_repr(obj: object, limit: int = REPR_CAP) -> Any:
    """`repr(obj)`, the only read here that runs the program's code (`__repr__`), for the
    explicit `:repr` type: builtin containers are shown a few levels and items deep, the whole
    text is cut at `limit` characters ("..." appended), and an exception makes FAULT. The
    size is capped, the time is not: a slow `__repr__` is slow."""
    try:
        # Any positive limit works; one instance per limit, built once (bounded: callers
        # pass constants).
        renderer = _REPRS.get(limit)
        if renderer is None:
            renderer = _REPRS.setdefault(limit, _CappedRepr(limit))
        return _cap_str(renderer.repr(obj), limit)
    except Exception:  # noqa: BLE001 - the program's __repr__ failed
        return FAULT

"""trace/safe.py: reads that run none of the program's code.

Every hook of the program below appends to `CALLS` when it runs; a read that must not run it
checks that `CALLS` stays empty.
"""

from __future__ import annotations

import copy
import functools
import pickle
import types
import warnings
from collections import Counter, OrderedDict, defaultdict, deque
from enum import IntEnum, StrEnum
from typing import Any

import pytest

from pykprobes.trace.safe import (
    DICT_SCAN_CAP,
    FAULT,
    REPR_CAP,
    STR_CAP,
    Opaque,
    capped_repr,
    class_lookup,
    describe,
    get_attr,
    get_item,
    type_qualname,
)

CALLS: list[str] = []


@pytest.fixture(autouse=True)
def _no_calls() -> Any:
    CALLS.clear()
    yield
    CALLS.clear()


# ----------------------------------------------------------------- the program's classes


class Plain:
    klass = "class value"
    shadowed = "class"

    def __init__(self) -> None:
        self.x = 1
        self.shadowed = "instance"

    def method(self) -> int:
        return 1

    @staticmethod
    def static() -> int:
        return 2

    @classmethod
    def clsmethod(cls) -> int:
        return 3


class WithProperty:
    def __init__(self) -> None:
        self.x = 1

    @property
    def prop(self) -> int:
        CALLS.append("property")
        return 42


class WithGetattr:
    def __init__(self) -> None:
        self.x = 1

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"__getattr__ {name}")
        return 42


class WithGetattribute:
    def __init__(self) -> None:
        self.x = 1

    def __getattribute__(self, name: str) -> Any:
        CALLS.append(f"__getattribute__ {name}")
        return object.__getattribute__(self, name)


class DataDescriptor:
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        CALLS.append("data __get__")
        return 42

    def __set__(self, obj: Any, value: Any) -> None:
        CALLS.append("data __set__")


class NonDataDescriptor:
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        CALLS.append("non-data __get__")
        return 42


class WithDescriptors:
    data = DataDescriptor()
    nondata = NonDataDescriptor()

    def __init__(self) -> None:
        self.__dict__["data"] = "instance data"  # loses to the data descriptor
        self.__dict__["nondata_shadowed"] = "instance"

    nondata_shadowed = NonDataDescriptor()

    @functools.cached_property
    def cached(self) -> int:
        CALLS.append("cached_property")
        return 7


class WithSlots:
    __slots__ = ("a", "b")

    def __init__(self) -> None:
        self.a = 1


class WithDictProperty:
    def __init__(self) -> None:
        self.x = 1

    @property
    def __dict__(self) -> Any:  # type: ignore[override]
        CALLS.append("__dict__ property")
        return {"x": 42}


class WithClassProperty:
    def __init__(self) -> None:
        self.x = 1

    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        CALLS.append("__class__ property")
        return int


class Meta(type):
    # A `__qualname__` in a class body is the class's own qualname (type_new() wants a str):
    # a metaclass changes what `cls.__qualname__` reads with __getattribute__ (below) or
    # with a property for another of type's fields, such as `__name__`.
    @property
    def __name__(cls) -> str:  # type: ignore[override]
        CALLS.append("metaclass __name__")
        return "Lie"

    @property
    def __mro__(cls) -> Any:
        CALLS.append("metaclass __mro__")
        return (object,)

    @property
    def meta_prop(cls) -> int:
        CALLS.append("metaclass property")
        return 1

    def __getattribute__(cls, name: str) -> Any:
        CALLS.append(f"metaclass __getattribute__ {name}")
        return type.__getattribute__(cls, name)

    def meta_method(cls) -> int:
        return 1


class UnderMeta(metaclass=Meta):
    attr = "class attr"

    def __init__(self) -> None:
        self.x = 1


class Hooked:
    """Every protocol hook the program could have, each one logged."""

    def __repr__(self) -> str:
        CALLS.append("__repr__")
        return "<hooked " + "r" * 1000 + ">"

    def __str__(self) -> str:
        CALLS.append("__str__")
        return "hooked"

    def __len__(self) -> int:
        CALLS.append("__len__")
        return 3

    def __bool__(self) -> bool:
        CALLS.append("__bool__")
        return False

    def __hash__(self) -> int:
        CALLS.append("__hash__")
        return 1

    def __eq__(self, other: object) -> bool:
        CALLS.append("__eq__")
        return False


class Key:
    """A dict key whose hash collides with the str it wraps, and whose == runs code."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        CALLS.append("Key.__hash__")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        CALLS.append("Key.__eq__")
        return other == self.name


class Color(IntEnum):
    RED = 1


class Name(StrEnum):
    ALICE = "alice"


# ----------------------------------------------------------------------------- get_attr


def test_instance_dict_and_class_data() -> None:
    obj = Plain()
    assert get_attr(obj, "x") == 1
    assert get_attr(obj, "klass") == "class value"
    assert get_attr(obj, "shadowed") == "instance"
    assert get_attr(obj, "missing") is FAULT


def test_methods_bind_as_the_program_would_see_them() -> None:
    obj = Plain()
    bound = get_attr(obj, "method")
    assert isinstance(bound, types.MethodType) and bound() == 1
    assert get_attr(obj, "static")() == 2
    assert get_attr(obj, "clsmethod")() == 3
    assert get_attr(obj, "__class__") is Plain
    assert get_attr([], "append") is not FAULT  # a C method descriptor binds in C


def test_property_is_not_run() -> None:
    assert get_attr(WithProperty(), "prop") is FAULT
    assert get_attr(WithProperty(), "x") == 1
    assert CALLS == []


def test_getattr_is_not_run() -> None:
    obj = WithGetattr()
    assert get_attr(obj, "x") == 1
    assert get_attr(obj, "nothing") is FAULT
    assert CALLS == []


def test_getattribute_override_is_not_run() -> None:
    obj = WithGetattribute()
    CALLS.clear()
    assert get_attr(obj, "x") == 1
    assert get_attr(obj, "nothing") is FAULT
    assert CALLS == []


def test_descriptors_are_not_run() -> None:
    obj = WithDescriptors()
    assert get_attr(obj, "data") is FAULT  # a data descriptor wins over the dict: not readable
    assert get_attr(obj, "nondata") is FAULT
    assert get_attr(obj, "nondata_shadowed") == "instance"  # the dict wins over non-data
    assert get_attr(obj, "cached") is FAULT  # cached_property not computed yet
    assert CALLS == []
    assert obj.cached == 7  # the program computes it ...
    CALLS.clear()
    assert get_attr(obj, "cached") == 7  # ... then it is plain instance data
    assert CALLS == []


def test_class_changes_are_seen() -> None:
    class Base:
        pass

    class Changing(Base):
        def __init__(self) -> None:
            self.x = 1

    class OtherBase:
        @property
        def y(self) -> int:
            CALLS.append("base property")
            return 2

    obj = Changing()
    assert get_attr(obj, "x") == 1
    setattr(Changing, "x", property(lambda self: CALLS.append("late property")))  # noqa: B010
    assert get_attr(obj, "x") is FAULT
    delattr(Changing, "x")
    assert get_attr(obj, "x") == 1
    obj.__dict__["y"] = "instance"
    assert get_attr(obj, "y") == "instance"
    Changing.__bases__ = (OtherBase,)
    assert get_attr(obj, "y") is FAULT
    assert CALLS == []


def test_slots() -> None:
    obj = WithSlots()
    assert get_attr(obj, "a") == 1
    assert get_attr(obj, "b") is FAULT  # unset slot


def test_dict_property_and_class_property_are_not_run() -> None:
    obj = WithDictProperty()
    assert get_attr(obj, "x") == 1
    assert get_attr(obj, "__dict__") is FAULT
    other = WithClassProperty()
    assert get_attr(other, "x") == 1
    assert get_attr(other, "__class__") is FAULT
    assert describe(other).startswith("<WithClassProperty at 0x")
    assert CALLS == []


def test_metaclass_hooks_are_not_run() -> None:
    obj = UnderMeta()
    CALLS.clear()
    assert get_attr(obj, "x") == 1
    assert get_attr(obj, "attr") == "class attr"
    assert get_attr(UnderMeta, "attr") == "class attr"
    assert get_attr(UnderMeta, "meta_prop") is FAULT
    assert get_attr(UnderMeta, "__name__") is FAULT  # the metaclass's property
    assert get_attr(UnderMeta, "meta_method")() == 1
    assert get_attr(UnderMeta, "__qualname__") == "UnderMeta"  # type's own C getset
    assert type_qualname(UnderMeta) == "UnderMeta"
    assert describe(obj).startswith("<UnderMeta at 0x")
    assert describe(UnderMeta) == "<class UnderMeta>"
    assert CALLS == []


def test_class_attributes() -> None:
    assert get_attr(Plain, "klass") == "class value"
    assert get_attr(Plain, "method") is Plain.__dict__["method"]
    assert get_attr(Plain, "static")() == 2
    assert get_attr(Plain, "clsmethod")() == 3
    assert isinstance(get_attr(WithProperty, "prop"), property)
    assert get_attr(WithDescriptors, "nondata") is FAULT
    assert get_attr(dict, "fromkeys")("ab") == {"a": None, "b": None}
    assert get_attr(Plain, "__doc__") is FAULT  # type.__doc__ may call a descriptor
    assert CALLS == []


def test_modules() -> None:
    module = types.ModuleType("fake_module")
    module.value = 5  # type: ignore[attr-defined]

    def module_getattr(name: str) -> Any:
        CALLS.append("module __getattr__")
        return 1

    module.__getattr__ = module_getattr  # type: ignore[method-assign]  # PEP 562
    assert get_attr(module, "value") == 5
    assert get_attr(module, "__name__") == "fake_module"
    assert get_attr(module, "missing") is FAULT
    assert CALLS == []
    assert describe(module) == "<module fake_module>"


def test_builtin_getsets() -> None:
    assert get_attr(3, "real") == 3
    assert get_attr(ValueError("boom"), "args") == ("boom",)
    assert get_attr(Plain.method, "__name__") == "method"
    assert get_attr(Plain.method, "__qualname__") == "Plain.method"
    import datetime

    assert get_attr(datetime.date(2024, 5, 6), "month") == 5
    assert get_attr(Plain.method.__code__, "co_lnotab") is FAULT  # warns on 3.12
    assert get_attr(Plain, "__annotations__") is FAULT


def test_weakref_proxy_is_not_followed() -> None:
    import weakref

    target = WithProperty()
    proxy = weakref.proxy(target)
    assert get_attr(proxy, "x") is FAULT
    assert get_attr(proxy, "prop") is FAULT
    assert CALLS == []


# ----------------------------------------------------------------------------- get_item


def test_sequences() -> None:
    assert get_item([10, 20, 30], 0) == 10
    assert get_item([10, 20, 30], -1) == 30
    assert get_item((1, 2), 1) == 2
    assert get_item("abc", 1) == "b"
    assert get_item(b"abc", 0) == 97
    assert get_item([1], 5) is FAULT
    assert get_item([1], "0") is FAULT
    assert get_item(range(3), 0) is FAULT  # not one of the types read


def test_dicts() -> None:
    d = {"Host": "example.org", 1: "one", None: "none", b"k": "bytes", 1.5: "float"}
    assert get_item(d, "Host") == "example.org"
    assert get_item(d, 1) == "one"
    assert get_item(d, True) == "one"  # True == 1, both builtin
    assert get_item(d, None) == "none"
    assert get_item(d, b"k") == "bytes"
    assert get_item(d, 1.5) == "float"
    assert get_item(d, "nope") is FAULT
    assert get_item(OrderedDict(a=1), "a") == 1
    assert get_item(Counter("aab"), "a") == 2


def test_defaultdict_factory_and_missing_are_not_run() -> None:
    def factory() -> int:
        CALLS.append("factory")
        return 0

    dd = defaultdict(factory, a=1)
    assert get_item(dd, "a") == 1
    assert get_item(dd, "b") is FAULT
    assert "b" not in dd
    assert get_item(Counter("a"), "z") is FAULT  # Counter.__missing__ not run
    assert CALLS == []


def test_dict_subclass_is_not_read() -> None:
    class MyDict(dict[str, int]):
        def __getitem__(self, key: str) -> int:
            CALLS.append("__getitem__")
            return 0

    assert get_item(MyDict(a=1), "a") is FAULT
    assert CALLS == []


def test_key_hash_and_eq_are_not_run() -> None:
    d = {Key("Host"): "by key", "Other": 1}
    CALLS.clear()
    assert hash(Key("Host")) == hash("Host")  # the lookup of "Host" would compare with it
    CALLS.clear()
    assert get_item(d, "Host") is FAULT
    assert get_item(d, "Other") is FAULT  # any stored key of a program class: not read
    assert CALLS == []
    # The key itself must be of a builtin type.
    assert get_item({"a": 1}, Key("a")) is FAULT
    assert get_item({"a": 1}, ("a",)) is FAULT
    assert CALLS == []


def test_a_colliding_key_in_an_instance_or_class_dict_is_not_compared() -> None:
    """`obj.attr` looks `attr` up in the instance's `__dict__` (and the class's): a stored key
    of a program class with the same hash would have its `__eq__` run by that lookup."""

    class Plain:
        pass

    class Colliding:
        def __hash__(self) -> int:
            return hash("Host")

        def __eq__(self, other: object) -> bool:
            CALLS.append("Colliding.__eq__")
            return False

    obj = Plain()
    obj.Host = "value"
    assert get_attr(obj, "Host") == "value"
    vars(obj)[Colliding()] = "by key"  # legal: an instance dict may hold any key
    CALLS.clear()
    assert get_attr(obj, "Host") is FAULT
    assert get_attr(obj, "missing") is FAULT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 3.13 warns about such a class
        klass = type("Odd", (), {Colliding(): 1, "Host": 2, "data": 3})
    CALLS.clear()
    assert get_attr(klass, "Host") is FAULT
    assert get_attr(klass(), "data") is FAULT
    assert get_attr(klass(), "Host") is FAULT
    assert CALLS == []
    # The module path (a module's globals may hold any key too).
    module = types.ModuleType("odd_module")
    module.Host = 1
    vars(module)[Colliding()] = 2
    CALLS.clear()
    assert get_attr(module, "Host") is FAULT
    assert CALLS == []


def test_big_dicts_are_not_scanned() -> None:
    d = {str(i): i for i in range(DICT_SCAN_CAP)}
    assert get_item(d, "5") == 5
    d["one more"] = 0
    assert get_item(d, "5") is FAULT


# ----------------------------------------------------------------------------- describe


def test_describe_builtin_values() -> None:
    assert describe(None) is None
    assert describe(True) is True
    assert describe(3) == 3
    assert describe(2.5) == 2.5
    assert describe("text") == "text"
    assert describe(b"data") == b"data"
    long_text = describe("x" * 1000)
    assert long_text == "x" * STR_CAP + "..."
    assert describe(b"y" * 1000) == b"y" * STR_CAP + b"..."


def test_describe_subclasses_of_builtins_as_their_value() -> None:
    value = describe(Color.RED)
    assert value == 1 and type(value) is int
    name = describe(Name.ALICE)
    assert name == "alice" and type(name) is str


def test_describe_objects_without_running_their_code() -> None:
    obj = Hooked()
    text = describe(obj)
    assert isinstance(text, Opaque)
    assert text == f"<Hooked at {id(obj):#x}>"
    assert repr(text) == text  # printed unquoted
    assert describe([1, 2]).startswith("<list at 0x")
    assert describe(test_describe_builtin_values).startswith(
        "<function test_describe_builtin_values at 0x"
    )
    assert describe(FAULT) is FAULT
    assert CALLS == []


# --------------------------------------------------------------------------- capped_repr


def test_capped_repr_runs_repr_under_the_cap() -> None:
    text = capped_repr(Hooked(), 50)
    assert CALLS == ["__repr__"]
    assert text == "<hooked " + "r" * 42 + "..."
    assert len(capped_repr(Hooked())) == REPR_CAP + 3


def test_capped_repr_bounds_builtin_containers() -> None:
    big = list(range(100_000))
    text = capped_repr(big)
    assert text.startswith("[0, 1, 2") and "..." in text and len(text) < 200
    # Sets and dicts in iteration order: reprlib sorted them whole to show a few items
    # (time in the size, and the program's __lt__ on each key).
    assert capped_repr(set(range(1_000_000))).startswith("{0, 1, 2")
    assert capped_repr({i: i for i in range(1_000_000)}).startswith("{0: 0, 1: 1, ")
    assert capped_repr(frozenset()) == "frozenset()" and capped_repr({}) == "{}"
    assert capped_repr([10**5000]).startswith("[0x31e2")  # repr() of it raises ValueError
    nested: list[Any] = [[[[[["deep"]]]]]]
    assert "deep" not in capped_repr(nested)
    assert capped_repr({"a": (1, deque([2]))}) == "{'a': (1, deque([2]))}"


def test_capped_repr_fault() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    class NotText:
        def __repr__(self) -> Any:
            return 5

    assert capped_repr(Broken()) is FAULT
    assert capped_repr(NotText()) is FAULT
    assert capped_repr([Broken()]) is FAULT


# --------------------------------------------------------------------------------- FAULT


def test_fault_marker() -> None:
    assert str(FAULT) == repr(FAULT) == "(fault)"
    assert copy.copy(FAULT) is FAULT
    assert copy.deepcopy(FAULT) is FAULT
    assert pickle.loads(pickle.dumps(FAULT)) is FAULT


def test_class_lookup() -> None:
    assert class_lookup(Plain, "klass") == "class value"
    assert class_lookup(Plain, "nothing", 0) == 0
    assert isinstance(class_lookup(WithProperty, "prop"), property)
    assert CALLS == []

"""pykprobes.grammar on good definitions: every form -> the record docs/events.md describes."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pykprobes import grammar
from pykprobes.errors import ERRORS, ParseError
from pykprobes.grammar import FetchArgDef, ProbeDef, RemoveDef, derive_event_name, parse, parse_boot

SRC = Path(grammar.__file__).resolve().parents[1]


def probe(line: str) -> ProbeDef:
    definition = parse(line)
    assert isinstance(definition, ProbeDef)
    return definition


def fields(definition: ProbeDef) -> dict[str, object]:
    return {
        name: getattr(definition, name)
        for name in (
            "kind",
            "group",
            "event",
            "maxactive",
            "target",
            "target_kind",
            "module",
            "qualname",
            "offset",
            "path",
            "line",
        )
    }


def arg_fields(arg: FetchArgDef) -> tuple[object, ...]:
    return (arg.name, arg.body, arg.type, arg.kind, arg.root, arg.chain)


# ------------------------------------------------------------------------ probe points


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "p json.decoder:JSONDecoder.decode",
            dict(kind="p", group="pykprobes", event="p_json_decoder_JSONDecoder_decode_0",
                 maxactive=0, target="json.decoder:JSONDecoder.decode", target_kind="symbol",
                 module="json.decoder", qualname="JSONDecoder.decode", offset=0, path=None,
                 line=None),
        ),
        (
            "p:mygrp/myev pkg.mod:f+0x10",
            dict(kind="p", group="mygrp", event="myev", maxactive=0, target="pkg.mod:f+0x10",
                 target_kind="symbol", module="pkg.mod", qualname="f", offset=16, path=None,
                 line=None),
        ),
        (
            "p:myev pkg.mod:f+8",
            dict(kind="p", group="pykprobes", event="myev", maxactive=0, target="pkg.mod:f+8",
                 target_kind="symbol", module="pkg.mod", qualname="f", offset=8, path=None,
                 line=None),
        ),
        (
            "p:grp/ pkg.mod:f",
            dict(kind="p", group="grp", event="p_pkg_mod_f_0", maxactive=0, target="pkg.mod:f",
                 target_kind="symbol", module="pkg.mod", qualname="f", offset=0, path=None,
                 line=None),
        ),
        (
            "r pkg.mod:Cls.meth",
            dict(kind="r", group="pykprobes", event="r_pkg_mod_Cls_meth_0", maxactive=0,
                 target="pkg.mod:Cls.meth", target_kind="symbol", module="pkg.mod",
                 qualname="Cls.meth", offset=0, path=None, line=None),
        ),
        (
            "r100:g/e mod:f+0",
            dict(kind="r", group="g", event="e", maxactive=100, target="mod:f+0",
                 target_kind="symbol", module="mod", qualname="f", offset=0, path=None,
                 line=None),
        ),
        (
            "r0x10 mod:f",
            dict(kind="r", group="pykprobes", event="r_mod_f_0", maxactive=16, target="mod:f",
                 target_kind="symbol", module="mod", qualname="f", offset=0, path=None,
                 line=None),
        ),
        (
            "r4096 mod:f",
            dict(kind="r", group="pykprobes", event="r_mod_f_0", maxactive=4096,
                 target="mod:f", target_kind="symbol", module="mod", qualname="f", offset=0,
                 path=None, line=None),
        ),
        (
            "p mod:f%return",
            dict(kind="r", group="pykprobes", event="r_mod_f_0", maxactive=0, target="mod:f",
                 target_kind="symbol", module="mod", qualname="f", offset=0, path=None,
                 line=None),
        ),
        (
            "p:ev mod:f+0%return",
            dict(kind="r", group="pykprobes", event="ev", maxactive=0, target="mod:f+0",
                 target_kind="symbol", module="mod", qualname="f", offset=0, path=None,
                 line=None),
        ),
        (
            "p mod:outer.<locals>.inner",
            dict(kind="p", group="pykprobes", event="p_mod_outer__locals__inner_0",
                 maxactive=0, target="mod:outer.<locals>.inner", target_kind="symbol",
                 module="mod", qualname="outer.<locals>.inner", offset=0, path=None,
                 line=None),
        ),
        (
            "p mod:f.<locals>.<lambda>+2",
            dict(kind="p", group="pykprobes", event="p_mod_f__locals___lambda__2",
                 maxactive=0, target="mod:f.<locals>.<lambda>+2", target_kind="symbol",
                 module="mod", qualname="f.<locals>.<lambda>", offset=2, path=None,
                 line=None),
        ),
        (
            "p mod:<genexpr>",
            dict(kind="p", group="pykprobes", event="p_mod__genexpr__0", maxactive=0,
                 target="mod:<genexpr>", target_kind="symbol", module="mod",
                 qualname="<genexpr>", offset=0, path=None, line=None),
        ),
        (
            "p pkg.mod:<module>",
            dict(kind="p", group="pykprobes", event="p_pkg_mod__module__0", maxactive=0,
                 target="pkg.mod:<module>", target_kind="module", module="pkg.mod",
                 qualname="<module>", offset=0, path=None, line=None),
        ),
        (
            "p pkg.mod:<module>+24",
            dict(kind="p", group="pykprobes", event="p_pkg_mod__module__24", maxactive=0,
                 target="pkg.mod:<module>+24", target_kind="module", module="pkg.mod",
                 qualname="<module>", offset=24, path=None, line=None),
        ),
        (
            "p __main__:main",
            dict(kind="p", group="pykprobes", event="p___main___main_0", maxactive=0,
                 target="__main__:main", target_kind="symbol", module="__main__",
                 qualname="main", offset=0, path=None, line=None),
        ),
        (
            "p path/to/file.py:12",
            dict(kind="p", group="pykprobes", event="p_path_to_file_py_12", maxactive=0,
                 target="path/to/file.py:12", target_kind="line", module=None, qualname=None,
                 offset=0, path="path/to/file.py", line=12),
        ),
        (
            "p:l /abs/dir/gui.pyw:3",
            dict(kind="p", group="pykprobes", event="l", maxactive=0,
                 target="/abs/dir/gui.pyw:3", target_kind="line", module=None,
                 qualname=None, offset=0, path="/abs/dir/gui.pyw", line=3),
        ),
        (
            "p app.py:7",
            dict(kind="p", group="pykprobes", event="p_app_py_7", maxactive=0,
                 target="app.py:7", target_kind="line", module=None, qualname=None,
                 offset=0, path="app.py", line=7),
        ),
        (
            # A module named `py` in package `pkg`: a function, not a line.
            "p pkg.py:run",
            dict(kind="p", group="pykprobes", event="p_pkg_py_run_0", maxactive=0,
                 target="pkg.py:run", target_kind="symbol", module="pkg.py", qualname="run",
                 offset=0, path=None, line=None),
        ),
        (
            "p mod:café",
            dict(kind="p", group="pykprobes", event="p_mod_caf__0", maxactive=0,
                 target="mod:café", target_kind="symbol", module="mod", qualname="café",
                 offset=0, path=None, line=None),
        ),
    ],
)  # fmt: skip
def test_probe_points(line: str, expected: dict[str, object]) -> None:
    definition = probe(line)
    assert fields(definition) == expected
    assert definition.text == line
    assert definition.args == []
    assert definition.target_pos == line.index(" ") + 1


def test_whitespace_and_columns_are_those_of_the_line_as_given() -> None:
    line = "  p:ev\t pkg.mod:f   x   y.z \n"
    definition = probe(line)
    assert definition.text == line
    assert definition.target_pos == line.index("pkg")
    assert [a.pos for a in definition.args] == [line.index("x"), line.index("y.z")]
    with pytest.raises(ParseError) as info:
        parse("  p   mod:f   $retval")
    assert (info.value.code, info.value.pos) == ("RETVAL_ON_PROBE", 14)


def test_remove() -> None:
    definition = parse("-:myev")
    assert isinstance(definition, RemoveDef)
    assert (definition.kind, definition.group, definition.event, definition.args) == (
        "-",
        None,
        "myev",
        [],
    )
    definition = parse("-:grp/myev pkg.mod:f x")
    assert isinstance(definition, RemoveDef)
    assert (definition.group, definition.event, definition.args) == (
        "grp",
        "myev",
        ["pkg.mod:f", "x"],
    )
    assert definition.text == "-:grp/myev pkg.mod:f x"


def test_names_at_the_length_limits() -> None:
    name = "g" * (grammar.MAX_EVENT_NAME_LEN - 1)
    definition = probe(f"p:{name}/{name} mod:f")
    assert (definition.group, definition.event) == (name, name)
    arg = "a" * grammar.MAX_ARG_NAME_LEN
    assert probe(f"p mod:f {arg}=x").args[0].name == arg


# ------------------------------------------------------------------------ derived names


def test_derive_event_name() -> None:
    assert derive_event_name("p", module="vfs", qualname="read") == "p_vfs_read_0"
    assert derive_event_name("r", module="a.b", qualname="C.d", offset=12) == "r_a_b_C_d_12"
    assert derive_event_name("p", path="x/y.py", line=3) == "p_x_y_py_3"
    long = derive_event_name("p", module="m" * 100, qualname="f")
    assert len(long) == grammar.MAX_EVENT_NAME_LEN - 1
    assert long.startswith("p_mmm")
    # The record's default name is exactly this function's.
    definition = probe("r mod:outer.<locals>.f")
    assert definition.event == derive_event_name(
        "r", module="mod", qualname="outer.<locals>.f", offset=0
    )


# ------------------------------------------------------------------------ fetchargs


def test_fetchargs_every_form() -> None:
    line = (
        "r mod:f $arg1 $arg:path $retval $comm $stack $stack3 count self.conn.host "
        'kw["a b"] items[0] d[-1][0x2] \\42 \\-1.5e3 \\"hi there" \\\'q\''
    )
    definition = probe(line)
    assert [arg_fields(a) for a in definition.args] == [
        ("arg1", "$arg1", None, "arg", 1, ()),
        ("path", "$arg:path", None, "argname", "path", ()),
        ("retval", "$retval", None, "retval", None, ()),
        ("comm", "$comm", None, "comm", None, ()),
        ("stack", "$stack", None, "stack", None, ()),
        ("stack3", "$stack3", None, "stackn", 3, ()),
        ("count", "count", None, "local", "count", ()),
        ("self", "self.conn.host", None, "local", "self", (("attr", "conn"), ("attr", "host"))),
        ("kw", 'kw["a b"]', None, "local", "kw", (("item", "a b"),)),
        ("items", "items[0]", None, "local", "items", (("item", 0),)),
        ("d", "d[-1][0x2]", None, "local", "d", (("item", -1), ("item", 2))),
        ("arg12", "\\42", None, "imm", 42, ()),
        ("arg13", "\\-1.5e3", None, "imm", -1500.0, ()),
        ("arg14", '\\"hi there"', None, "imm", "hi there", ()),
        ("arg15", "\\'q'", None, "imm", "q", ()),
    ]
    for arg in definition.args:
        assert line[arg.pos :].startswith(arg.body)
        assert arg.body_pos == arg.pos


def test_fetchargs_names_and_types() -> None:
    line = "p mod:f n=$arg2:int s=self.name:str x=kw['k:v']:repr y=$arg:t:type $COMM:string"
    definition = probe(line)
    assert [(a.name, a.body, a.type) for a in definition.args] == [
        ("n", "$arg2", "int"),
        ("s", "self.name", "str"),
        ("x", "kw['k:v']", "repr"),
        ("y", "$arg:t", "type"),
        ("comm", "$COMM", "string"),
    ]
    for arg in definition.args:
        assert line[arg.pos :].startswith(arg.body if arg.name == "comm" else arg.name + "=")
        assert line[arg.body_pos :].startswith(arg.body)
        assert arg.type is not None and arg.type_pos is not None
        assert line[arg.type_pos - 1 :].split(" ")[0] == ":" + arg.type
    assert [a.root for a in definition.args] == [2, "self", "kw", "t", None]


# One fetcharg of each form, as the word after "r mod:func ".
GOOD_ARGS = [
    "x",
    "$arg1",
    "$arg:name",
    "$retval",
    "$comm",
    "$COMM:string",
    "$stack",
    "$stack0",
    "$stack12:str",
    "\\0x1f",
    "\\-3:x",
    "\\1.5e3",
    "\\'text'",
    "\\'a b'",
    'req.headers["Host"]',
    "items[0].name:len",
    "a.b.c[-1]['k'][ 2 ]",
    "$retval.x[0]",
    "$arg2.y:repr",
    "d[0x10]",
    "n=$arg:x.y:int",
    "kw[ 'k v' ]:str",
]


@pytest.mark.parametrize("arg", GOOD_ARGS)
def test_parse_fetcharg_is_one_fetcharg_of_parse(arg: str) -> None:
    """parse_fetcharg() (for trace.fetchargs.compile_fetcharg) gives the record that parse()
    gives for the same fetcharg of a definition, followed by others or not."""
    for text in (f"r mod:func {arg}", f"r mod:func {arg}  y"):
        (d, *_) = probe(text).args
        one = grammar.parse_fetcharg(text, 11, is_return=True)
        slots = FetchArgDef.__slots__
        assert [getattr(one, s) for s in slots] == [getattr(d, s) for s in slots]


def test_parse_fetcharg_errors_point_into_the_text() -> None:
    text = "p mod:f a=x b=y.1 c=$retval"
    assert grammar.parse_fetcharg(text, 8, is_return=False).name == "a"
    for pos, is_return, code, column in [
        (12, False, "BAD_FETCH_ARG", 16),
        (18, False, "RETVAL_ON_PROBE", 20),
        (len(text), False, "NO_ARG_BODY", len(text)),
    ]:
        with pytest.raises(ParseError) as info:
            grammar.parse_fetcharg(text, pos, is_return=is_return)
        assert (info.value.code, info.value.pos, info.value.text) == (code, column, text)
    assert grammar.parse_fetcharg(text, 18, is_return=True).kind == "retval"


@pytest.mark.parametrize("typ", sorted(grammar.FETCH_TYPES))
def test_every_type(typ: str) -> None:
    (arg,) = probe(f"p mod:f x:{typ}").args
    assert (arg.type, arg.type_pos) == (typ, len("p mod:f x:"))


def test_root_name_is_used_only_when_unique() -> None:
    definition = probe("p mod:f self.a self.b other.c \\1 other2 x=$arg1 x.y")
    assert [a.name for a in definition.args] == [
        "arg1",
        "arg2",
        "other",
        "arg4",
        "other2",
        "x",
        "arg7",
    ]


def test_unnamable_roots_fall_back_to_argn() -> None:
    long = "v" * (grammar.MAX_ARG_NAME_LEN + 1)
    definition = probe(f"p mod:f café {long} $arg:naïve common_pid")
    assert [a.name for a in definition.args] == ["arg1", "arg2", "arg3", "arg4"]
    assert [a.root for a in definition.args] == ["café", long, "naïve", "common_pid"]


def test_chains_on_values() -> None:
    definition = probe("r mod:f $retval.status $arg1[0] $arg:req.headers['Host']")
    assert [(a.name, a.kind, a.chain) for a in definition.args] == [
        ("retval", "retval", (("attr", "status"),)),
        ("arg1", "arg", (("item", 0),)),
        ("req", "argname", (("attr", "headers"), ("item", "Host"))),
    ]


def test_spaces_inside_brackets_and_quotes() -> None:
    definition = probe('p mod:f kw[ "a b" ] m[ 1 ]:int \\"x y z"')
    assert [(a.body, a.chain) for a in definition.args] == [
        ('kw[ "a b" ]', (("item", "a b"),)),
        ("m[ 1 ]", (("item", 1),)),
        ('\\"x y z"', ()),
    ]
    assert definition.args[1].type == "int"


def test_max_args() -> None:
    words = " ".join(f"\\{i}" for i in range(grammar.MAX_TRACE_ARGS))
    definition = probe(f"p mod:f {words}")
    assert len(definition.args) == grammar.MAX_TRACE_ARGS
    assert definition.args[-1].name == f"arg{grammar.MAX_TRACE_ARGS}"


# ------------------------------------------------------------------------ parse_boot


def test_parse_boot_splits_on_semicolons_and_commas() -> None:
    results = parse_boot(
        'p:ev,pkg.mod:f,x,kw["a,b"];;r,pkg.mod:g,$retval ; -:ev;p,mod:f,\\"x;y,z"'
    )
    texts = [text for text, _ in results]
    assert texts == [
        'p:ev pkg.mod:f x kw["a,b"]',
        "r pkg.mod:g $retval",
        "-:ev",
        'p mod:f \\"x;y,z"',
    ]
    first = results[0][1]
    assert isinstance(first, ProbeDef)
    assert first.text == texts[0]
    assert [(a.name, a.chain) for a in first.args] == [("x", ()), ("kw", (("item", "a,b"),))]
    assert isinstance(results[1][1], ProbeDef)
    assert results[1][1].kind == "r"
    assert isinstance(results[2][1], RemoveDef)
    last = results[3][1]
    assert isinstance(last, ProbeDef)
    assert last.args[0].root == "x;y,z"


def test_parse_boot_reports_errors_and_goes_on() -> None:
    results = parse_boot("p,mod:f,$retval;p,mod:g;x")
    assert [text for text, _ in results] == ["p mod:f $retval", "p mod:g", "x"]
    error = results[0][1]
    assert isinstance(error, ParseError)
    assert (error.code, error.pos, error.text) == ("RETVAL_ON_PROBE", 8, "p mod:f $retval")
    assert isinstance(results[1][1], ProbeDef)
    assert isinstance(results[2][1], ParseError)
    assert results[2][1].code == "BAD_PROBE_TYPE"


def test_parse_boot_empty() -> None:
    assert parse_boot("") == []
    assert parse_boot(" ; ;, ") == []


# ------------------------------------------------------------------------ robustness


def test_only_parse_errors_ever_escape() -> None:
    """Whatever the text, parse() returns a record or raises a ParseError with a code from
    the table and a column inside the text (or just after it): never another exception."""
    pieces = [
        "p", "r", "-", ":", "/", "+", "%", "%return", "$", "arg", "stack", "retval", "comm",
        "=", "\\", '"', "'", "[", "]", ".", "<", ">", "module", "locals", "x", "py", "0x",
        "1", "9", " ", " ", "mod", "f", "_", "é", "\t", "int",
    ]  # fmt: skip
    rng = random.Random(1234)
    for _ in range(5000):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        try:
            parse(line)
        except ParseError as exc:
            assert exc.code in ERRORS, (line, exc.code)
            assert 0 <= exc.pos <= len(line) + 1, (line, exc.pos)
            assert exc.text == line
        for _, result in parse_boot(line):
            assert isinstance(result, (ProbeDef, RemoveDef, ParseError))


# ------------------------------------------------------------------------ import weight

HEAVY = ("re", "dataclasses", "typing")


def _new_modules(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


def test_grammar_imports_no_heavy_module() -> None:
    """The boot stage parses PYKPROBES_EVENTS at start-up: pykprobes.grammar (and the errors
    leaf it uses) must not pull in re, dataclasses or typing. The parent package is stood in
    for by an empty one, so that only the leaves' own imports are measured."""
    new = _new_modules(
        f"""
        import sys, types
        before = set(sys.modules)
        package = types.ModuleType("pykprobes")
        package.__path__ = [{str(SRC / "pykprobes")!r}]
        sys.modules["pykprobes"] = package
        import pykprobes.grammar
        pykprobes.grammar.parse("p:g/e pkg.mod:f+2 x=$arg1:int y.z kw['a']")
        pykprobes.grammar.parse_boot("p,mod:f;-:e")
        print(*sorted(set(sys.modules) - before))
        """
    )
    assert "pykprobes.grammar" in new
    assert [m for m in HEAVY if m in new] == []


def test_import_pykprobes_grammar_adds_no_heavy_module() -> None:
    """`import pykprobes.grammar` as the boot stage writes it: whatever the package itself
    costs, the grammar adds none of the heavy modules."""
    new = _new_modules(
        """
        import sys
        import pykprobes
        before = set(sys.modules)
        import pykprobes.grammar
        print(*sorted(set(sys.modules) - before))
        """
    )
    assert "pykprobes.grammar" in new
    assert [m for m in HEAVY if m in new] == []

"""The architecture-independent core of pykprobes (kernel/kprobes.c)."""

from pykprobes import env

if env.FREE_THREADED:
    # One line, not a traceback from deep inside: every entry point (the API, the CLI, the
    # boot stage) comes through here (docs/pythons.md, "Free-threaded builds").
    raise ImportError(env.FREE_THREADED_REFUSAL)

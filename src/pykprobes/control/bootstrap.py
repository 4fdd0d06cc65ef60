"""The attach bootstrap: the script `sys.remote_exec` runs in the target (PEP 768).

attach.py writes this file's source, followed by one call line with the arguments, to
`DIR/attach-PID.py` in the target's control directory; CPython runs it in the target's main
thread, in a namespace of its own, at the next check of its eval breaker. It

1. imports `pykprobes.control` as the target finds it; where the target has no pykprobes,
   and only if it runs the attacher's Python minor version, it puts the attacher's
   installation directories (`paths`: pykprobes' and its dependency bytecode's) first on
   `sys.path` for that import alone, and takes them off again; pykprobes finds its own
   modules through its package's `__path__` afterwards, and `bytecode` is imported while
   the directories are there;
2. starts the control server (`serve()`, idempotent) and writes `ok SOCKET_PATH`, or
   `error MESSAGE`, to the report file (mode 0600, in the private directory), atomically.

It leaves its script file to the attacher (which removes it once the report came): should
the script be queued twice, its second run finds it still there, and does no harm (`serve()`
is idempotent). It never raises: CPython would print the exception on the target's stderr
("Error executing debugger script"), and the target is not ours to write on. Importing
this module does nothing but define the function.
"""


def _pykprobes_attach(report: str, paths: list[str], version: tuple[int, int]) -> None:
    import os
    import sys

    def say(text: str) -> None:
        tmp = report + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
        os.replace(tmp, report)

    try:
        try:
            import pykprobes.control as control
        except ImportError as exc:
            here = "{}.{}".format(*sys.version_info[:2])
            there = "{}.{}".format(*version)
            if here != there:
                say(f"error pykprobes is not importable in the target ({exc}), and the "
                    f"attaching pykprobes is installed for Python {there}, not the target's "
                    f"{here}: install pykprobes in the target's environment")
                return
            added = [p for p in paths if p not in sys.path]
            sys.path[:0] = added
            try:
                import pykprobes.control as control
                try:
                    import bytecode  # noqa: F401 - the optimizer's, while the path is there
                except ImportError:
                    pass
            finally:
                for p in added:
                    try:
                        sys.path.remove(p)
                    except ValueError:
                        pass
        say("ok " + control.serve())
    except Exception as exc:  # noqa: BLE001 - reported to the attacher, never raised
        try:
            say(f"error {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the attacher times out and says so
            pass

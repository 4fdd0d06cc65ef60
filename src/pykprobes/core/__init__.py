"""The architecture-independent core of pykprobes (kernel/kprobes.c)."""

"""Probe events: kprobe_events for Python (docs/events.md), a client of the core's API."""

"""Load every JSON document under a directory (default: this Python's installation) with
json.loads, as a program that reads many real documents does. README's latency example."""

import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else sys.base_prefix
loaded = failed = 0
for folder, _, files in os.walk(root):
    for name in files:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    json.loads(f.read())
                loaded += 1
            except (OSError, ValueError):
                failed += 1
print(f"{loaded} documents loaded, {failed} not JSON")

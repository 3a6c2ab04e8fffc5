"""Print requirements.lock for the running environment: one `name==version` line per installed distribution.

Our own distribution is left out, and so is a build's local label (torch `2.13.0+cpu` is written `2.13.0`, which
the CUDA build of the same release satisfies too).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re

OWN = "tpa-rag"


def main() -> None:
    pins = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name in (OWN, "pip"):
            continue
        pins[name] = dist.version.split("+", 1)[0]
    print(f"# The exact versions `make test` last passed with (CPython {platform.python_version()}, "
          f"{platform.machine()}, {datetime.date.today().isoformat()}).")
    print("# Installed as constraints by `make setup` and the Dockerfile. Regenerate with `make lock`.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()

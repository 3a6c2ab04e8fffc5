"""`python -m tpa_core.quant.build`: compile the quantized-weights op now (what `make setup` runs)."""

from __future__ import annotations

import logging
import sys


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from tpa_core.quant.ops import OpsUnavailable, build

    try:
        path = build()
    except OpsUnavailable as exc:
        print(f"tpa-rag: {exc}\ntpa-rag: GGUF models will run with float32 weights (more memory, slower on large "
              f"models); install a C++ compiler and run `make setup` again to enable quantized weights.",
              file=sys.stderr)
        return 0  # not fatal: the float path runs everywhere
    print(f"tpa-rag: quantized-weights op ready ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

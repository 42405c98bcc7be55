"""One rank of a multi-process run: ``torchrun ... -m edgetune.finetune.worker spec.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m edgetune.finetune.worker <workdir>/spec.json", file=sys.stderr)
        return 2
    from .. import console
    from ..errors import EdgetuneError
    from .train import run_training

    spec = json.loads(Path(argv[0]).read_text())
    import os

    console.configure(quiet=os.environ.get("RANK", "0") != "0")
    try:
        run_training(spec)
    except EdgetuneError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

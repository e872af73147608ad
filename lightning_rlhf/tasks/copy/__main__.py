"""``python -m lightning_rlhf.tasks.copy [name ...]``: prepare the built-in artifacts (all by default)."""

import sys

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.tasks.copy.artifacts import prepare

try:
    prepare(*sys.argv[1:])
except ConfigError as err:
    print(f"lightning-rlhf: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None

"""``python -m lightning_rlhf.tasks builtin:<name> ...``: prepare built-in artifacts of any task
(the copy task when none is named)."""

import sys

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.tasks import prepare

try:
    prepare(*(sys.argv[1:] or ["builtin:sft"]))
except ConfigError as err:
    print(f"lightning-rlhf: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None

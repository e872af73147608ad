"""``python -m lightning_rlhf.tasks.copy [name ...]``: prepare the built-in artifacts (all by default)."""

import sys

from lightning_rlhf.tasks.copy.prepare import prepare

prepare(*sys.argv[1:])

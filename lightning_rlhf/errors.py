"""The one error type for bad configuration (bottom layer: imports nothing of ours).

Every check that can blame a value the user chose raises :class:`ConfigError`
with one sentence naming the value and the fix; ``lightning_rlhf.cli.explain``
finds it again inside jsonargparse's reports.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and how to fix it."""

"""Built-in tasks: data, gold reward and trained starting points that let the library run end to end offline.

Tasks sit on top of the package: they train their artifacts with its data
modules and LightningModules, and nothing below imports them. A ``builtin:``
source names one of their artifacts (:func:`lightning_rlhf.builtin.builtin_path`).
"""

from lightning_rlhf.builtin import BUILTIN_ARTIFACTS, BUILTIN_PREFIX, COPY_ARTIFACTS
from lightning_rlhf.errors import ConfigError


def prepare(*names: str) -> None:
    """Prepare what the ``builtin:`` sources ``names`` need, each once: the whole copy task
    if any is one of its artifacts."""
    from lightning_rlhf.tasks import arithmetic, copy

    wanted = {name.removeprefix(BUILTIN_PREFIX) for name in names}
    if unknown := sorted(wanted - set(BUILTIN_ARTIFACTS)):
        raise ConfigError(
            f"Unknown built-in artifact 'builtin:{unknown[0]}'; "
            f"choose one of {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_ARTIFACTS)}."
        )
    if wanted & set(COPY_ARTIFACTS):
        copy.prepare()
    if wanted & arithmetic.ARTIFACTS:
        arithmetic.prepare(*wanted)

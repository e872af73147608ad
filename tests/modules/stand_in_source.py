"""What a stand-in rollout source does besides sampling: nothing (no generator to refresh, nothing pending)."""


class StandInSource:
    """The :class:`~lightning_rlhf.contracts.RolloutSource` methods a module test's stand-in does not need;
    a subclass writes ``next_rollouts``."""

    def after_update(self, version):
        pass

    def pending_rows(self):
        return []

    def close(self):
        pass

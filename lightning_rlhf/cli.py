"""``lightning-rlhf``: the LightningCLI entry point (omegaconf parser mode).

``lightning-rlhf fit --config configs/quickstart.yaml`` trains; any key can be
overridden on the command line (``--model.init_args.beta 0.05``).

Unless a YAML sets ``trainer.logger``, runs log to both CSV and TensorBoard
under ``--trainer.default_root_dir``.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from lightning_rlhf.models import ConfigError


class RLHFCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation, module/datamodule chosen by ``class_path``, CSV + TensorBoard logging."""

    @override
    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or os.getcwd()
            kwargs.setdefault("logger", [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")])
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        RLHFCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except ConfigError as err:
        print(f"lightning-rlhf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

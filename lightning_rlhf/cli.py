"""``lightning-rlhf``: the LightningCLI entry point (omegaconf parser mode).

``lightning-rlhf fit --config configs/quickstart.yaml`` trains; any key can be
overridden on the command line (``--model.init_args.beta 0.05``).

Unless a YAML sets ``trainer.logger``, runs log to both CSV and TensorBoard
under ``--trainer.default_root_dir``. When the config names a ``builtin:``
artifact, what it needs is prepared first (once; :func:`lightning_rlhf.tasks.prepare`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from lightning_rlhf.builtin import BUILTIN_PREFIX
from lightning_rlhf.callbacks import WeightSync
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.export import export_checkpoint
from lightning_rlhf.strategies import AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy, AsyncRLHFStrategy
from lightning_rlhf.tasks import prepare

ASYNC_STRATEGIES = (AsyncRLHFStrategy, AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy)  # importing them registers
# their names (async_rlhf, async_rlhf_ddp, async_rlhf_deepspeed) with Lightning


class RLHFCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation, module/datamodule chosen by ``class_path``,
    CSV + TensorBoard logging."""

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        # a copy-task name prepares that whole task: a module's default reward is its reward model
        if names := _builtin_names(config.as_dict()):
            prepare(*names)

    @override
    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or os.getcwd()
            kwargs.setdefault("logger", [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")])
        trainer = super().instantiate_trainer(**kwargs)
        syncs = [c for c in trainer.callbacks if isinstance(c, WeightSync)]
        if isinstance(trainer.strategy, ASYNC_STRATEGIES) and not syncs:
            # every refresh logged and probed; added here because strategies never import callbacks
            trainer.callbacks.append(WeightSync())
        return trainer


class _NoLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines, advertisements for litlogger and litmodels that every Trainer without them
    logs (``trainer/connectors/logger_connector.py``, ``callback_connector.py``). Lightning has no switch for them
    (Lightning-AI/pytorch-lightning#21294); its other messages pass."""

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


_NO_TIPS = _NoLightningTips()
# rank_zero_info logs to the logger of whichever of these two modules was imported last
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _builtin_names(value) -> list[str]:
    """Every ``builtin:<name>`` string in a parsed config."""
    if isinstance(value, str):
        return [value] if value.startswith(BUILTIN_PREFIX) else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _builtin_names(item)]
    return []


def explain(err: BaseException) -> str:
    """One sentence for a configuration error, instead of jsonargparse's nested union report."""
    cause: BaseException | None = err
    while cause is not None:  # our own checks raise ConfigError with the fix in it
        if isinstance(cause, ConfigError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    if match := re.search(r"Option '([^']+)' is not accepted", text):
        where = re.search(r'Parser key "([^"]+)"', text)
        section = f"{where.group(1)}.init_args" if where else "the config"
        return (
            f"Unknown key '{match.group(1)}' under {section}; "
            "check its spelling (`lightning-rlhf fit --help` lists the keys)."
        )
    if match := re.search(r"unrecognized arguments: (\S+)", text):
        return (
            f"Unknown key '{match.group(1).lstrip('-')}'; "
            "check its spelling (`lightning-rlhf fit --help` lists the keys)."
        )
    if match := re.search(r"Key \"?'?([\w.]+)'?\"? is not expected", text):
        return f"Unknown key '{match.group(1)}'; check its spelling (`lightning-rlhf fit --help` lists the keys)."
    if "Does not validate against any of the Union subtypes" in text and (
        report := re.search(r"Errors:(.*?)Given value type:", text, re.S)
    ):
        # jsonargparse keeps only the text of the error a constructor raised; it is the item that is not
        # "Expected a <type>" (the union's other choices), and the class it came from is in the given value
        reasons = [
            " ".join(r.split())
            for r in re.split(r"(?:^|\n)\s*- ", report.group(1))
            if r.strip() and not r.strip().startswith(("Expected a ", "Does not validate"))  # nested unions' headers
        ]
        if reasons:
            owner = re.search(r"class_path='(?:[\w.]+\.)?(\w+)'", text)
            return f"{owner.group(1)}: {reasons[0]}" if owner else reasons[0]
    return " ".join(text.split())


def export(args: list[str]) -> None:
    """``lightning-rlhf export CHECKPOINT OUT_DIR``: a checkpoint's policy in Hugging Face format."""
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf export",
        description="Write the policy (or reward model) of a Lightning checkpoint, a .ckpt file or a DeepSpeed "
        "checkpoint folder, and its tokenizer in Hugging Face format.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or the folder of a DeepSpeed checkpoint")
    parser.add_argument("out_dir", help="where to write config.json, the weights and the tokenizer")
    parsed = parser.parse_args(args)
    try:
        out = export_checkpoint(parsed.checkpoint, parsed.out_dir)
    except ConfigError as err:
        print(f"lightning-rlhf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"lightning-rlhf: wrote {out}")


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in _LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(_NO_TIPS)  # once: addFilter skips a filter already there
    # the RL modules leave their batch where it is on purpose (RLModuleBase.transfer_batch_to_device), and
    # Lightning's data connector warns that the module's hook is used, which is the point
    warnings.filterwarnings(
        "ignore", re.escape("You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a")
    )
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        return export(argv[1:])
    try:
        RLHFCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            args=args,  # None: LightningCLI reads sys.argv itself (given both, it warns)
        )
    except (ConfigError, argparse.ArgumentError, ValueError, TypeError) as err:
        if (
            not isinstance(err, ConfigError)
            and not isinstance(err, argparse.ArgumentError)
            and "Does not validate" not in str(err)
        ):
            raise  # a bug or a runtime error, not a configuration problem: keep the traceback
        print(f"lightning-rlhf: error: {explain(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

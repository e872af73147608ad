"""Prompt, demonstration and preference datasets from the hub, local files or the built-in task."""

from lightning_rlhf.data.datamodules import (
    DemonstrationDataModule,
    PreferenceDataModule,
    PromptDataModule,
    check_context_length,
    load_rows,
)

__all__ = ["PromptDataModule", "DemonstrationDataModule", "PreferenceDataModule", "load_rows", "check_context_length"]

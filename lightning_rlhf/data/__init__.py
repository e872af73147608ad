"""Prompt, demonstration and preference datasets, and the built-in task."""

from lightning_rlhf.data.datamodules import DemonstrationDataModule, PreferenceDataModule, PromptDataModule, load_rows

__all__ = ["PromptDataModule", "DemonstrationDataModule", "PreferenceDataModule", "load_rows"]

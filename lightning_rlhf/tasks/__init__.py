"""Built-in tasks: data, gold reward and trained starting points that let the library run end to end offline.

Tasks sit on top of the package: they train their artifacts with its data
modules and LightningModules, and nothing below imports them. A ``builtin:``
source names one of their artifacts (:func:`lightning_rlhf.models.builtin_path`).
"""

"""Callbacks that carry gradwatch into training frameworks, each in a submodule that imports its framework:

- `gradwatch.integrations.lightning.GradwatchCallback` (PyTorch Lightning: `lightning.pytorch` or
  `pytorch_lightning`; extra `gradwatch[lightning]`);
- `gradwatch.integrations.transformers.GradwatchCallback` (the Hugging Face `Trainer`; extra
  `gradwatch[transformers]`).

Importing this package loads nothing but the standard library.
"""

from __future__ import annotations

__all__: list[str] = []

"""The README's TRL composition, importable (argument classes must pickle): `GradTrainerMixin` on `SFTTrainer`."""

from __future__ import annotations

from dataclasses import dataclass

import trl

from hf_gradtools import GradArgumentsMixin, GradTrainerMixin


@dataclass
class GradSFTConfig(GradArgumentsMixin, trl.SFTConfig):
    """`SFTConfig` with the gradient fields."""


class GradSFTTrainer(GradTrainerMixin, trl.SFTTrainer):
    """`SFTTrainer` with the gradient tools."""

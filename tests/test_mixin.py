"""sae_allocators.mixin.mix_in: the one way this package changes an object SAELens built (patches 7-10)."""

from __future__ import annotations

import pytest
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer

from sae_allocators.mixin import mix_in


class Counting(SAETrainer):
    calls = 0

    def save_checkpoint(self, checkpoint_name, wandb_aliases=None):  # noqa: ANN001, ARG002
        self.calls += 1
        return "counted"


class Naming(SAETrainer):
    prefix = ""

    def save_checkpoint(self, checkpoint_name, wandb_aliases=None):  # noqa: ANN001
        return self.prefix + str(super().save_checkpoint(checkpoint_name, wandb_aliases))


def test_mix_in_changes_the_object_in_place_and_stacks():
    # SAETrainer is a typing.Generic: a plain mixin class would not have its layout (the class
    # change would raise); a subclass of SAETrainer does
    trainer = object.__new__(SAETrainer)
    trainer.state = {"kept": True}
    same = mix_in(trainer, Counting)
    assert same is trainer and type(trainer) is Counting and trainer.state == {"kept": True}
    mix_in(trainer, Naming, prefix="global:")
    assert isinstance(trainer, Naming) and isinstance(trainer, Counting)
    assert trainer.save_checkpoint("x") == "global:counted" and trainer.calls == 1  # Naming first, then Counting
    mix_in(trainer, Naming, prefix="again:")  # a second time: attributes only, no second layer
    assert trainer.save_checkpoint("x") == "again:counted" and trainer.calls == 2
    other = mix_in(object.__new__(SAETrainer), Counting)
    assert type(other) is Counting  # the plain case needs no made-up class


def test_mix_in_refuses_a_class_that_does_not_adapt_the_object():
    with pytest.raises(TypeError, match="Counting adapts .*SAETrainer.*not a ActivationScaler"):
        mix_in(ActivationScaler(), Counting)

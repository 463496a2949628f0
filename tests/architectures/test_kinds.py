"""Each training class declares its rule kind once (``rule_kind``); everything else derives it."""

from __future__ import annotations

import pytest
import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE

import sae_allocators  # noqa: F401  registers the architectures
from sae_allocators.architectures import kinds
from sae_allocators.architectures._step import SelectionStepMixin
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_allocators.benchmark import configs
from sae_allocators.calibration import fit
from sae_allocators.names import OWN_ARCHITECTURES

from helpers import step_input

#: the declarations, pinned (a class that changes its kind changes calibration, the guard and checks)
EXPECTED = {
    "mutual_choice": kinds.BATCH_GLOBAL,
    "batchtopk_zipf": kinds.BATCH_GLOBAL,
    "feature_choice": kinds.BATCH_PER_FEATURE,
    "topk_zipf": kinds.PER_TOKEN,
    "abstopk_zipf": kinds.PER_TOKEN,
    "gradient_topk": kinds.PER_TOKEN,
    "top_afa": kinds.PER_TOKEN,
}


def test_every_step_architecture_declares_its_kind():
    declared = kinds.declared_kinds()
    assert {n: k for n, k in declared.items() if n in OWN_ARCHITECTURES} == EXPECTED
    for name, kind in EXPECTED.items():
        cls = get_sae_training_class(name)[0]
        assert issubclass(cls, SelectionStepMixin) and "rule_kind" in cls.__dict__, name  # declared on the class itself


def test_saelens_classes_without_a_declaration():
    assert kinds.rule_kind_of(BatchTopKTrainingSAE) == kinds.BATCH_GLOBAL
    assert kinds.rule_kind_of(TopKTrainingSAE) == kinds.PER_TOKEN
    assert "topk" not in kinds.declared_kinds() and "batchtopk" not in kinds.declared_kinds()


def test_a_bad_declaration_names_the_kinds():
    class Bad(TopKTrainingSAE):
        rule_kind = "per_batch"

    with pytest.raises(ValueError, match="rule_kind = 'per_batch'.*per_token, batch_global, batch_per_feature"):
        kinds.rule_kind_of(Bad)


def test_calibration_and_the_benchmark_read_the_declaration():
    assert fit.global_rules() == tuple(sorted(n for n, k in EXPECTED.items() if k == kinds.BATCH_GLOBAL))
    assert fit.per_feature_rules() == ("feature_choice",)
    for name, kind in EXPECTED.items():
        assert (fit.rule_of(name) is not None) is (kind in kinds.BATCH_KINDS), name
    plans = {p.label: p for p in configs.plan_architectures(None)}
    for name, kind in EXPECTED.items():
        assert plans[name].batch_level is (kind in kinds.BATCH_KINDS), name
    assert plans["batchtopk"].batch_level and not plans["topk"].batch_level


def test_the_kind_drives_the_step_checks():
    """A subclass that declares another kind gets that kind's checks: the batch budget, NaN refusal in
    encode and the outlier guard follow ``rule_kind``, not the class's name."""
    cfg = MutualChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=0.25)
    batch = MutualChoiceTrainingSAE(cfg)
    assert batch.batch_selection and batch.outlier_norm_ratio() > 0
    with pytest.raises(ValueError, match=r"floor\(k \* N\) = 0"):
        batch.training_forward_pass(step_input(torch.randn(2, 8)))  # 0.25 * 2 < 1
    nan = torch.randn(4, 8)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        batch.encode(nan)

    class PerToken(MutualChoiceTrainingSAE):
        rule_kind = kinds.PER_TOKEN

    per_token = PerToken(cfg)
    assert not per_token.batch_selection and per_token.outlier_norm_ratio() == 0
    per_token.encode(nan)  # a per-token rule encodes NaN rows without refusing the batch

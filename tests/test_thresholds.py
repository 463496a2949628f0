"""Unit tests of ``sae_allocators/thresholds.py`` (threshold tracker, export, budgets) in this process
(mutation target ``thresholds``, with test_calibration.py's fast tests).

The tracker is exercised on a stand-in owner (a module with a ``W_dec`` and a ``cfg``), so each
promise of the module docstring is checked against plain arithmetic, not against the architectures
that use it (tests/test_calibration.py and tests/architectures/ cover those).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from sae_allocators import thresholds as T
from sae_allocators.thresholds import (
    CalibrationConfig,
    ThresholdTracker,
    check_exportable,
    export_threshold,
    require_budget,
    smallest_working_batch,
    tokens_in,
)


class Owner(torch.nn.Module):
    """The least a tracker needs of its SAE: ``W_dec`` (for the device) and ``cfg`` (the rate)."""

    def __init__(self, d_sae: int = 6, rate: float = 0.25, **cfg):
        super().__init__()
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, 3))
        self.cfg = SimpleNamespace(rate=rate, **cfg)


def tracker(
    owner: Owner | None = None, shape: tuple[int, ...] = (6,), age: bool = True, calibrated: bool = True
) -> ThresholdTracker:
    return ThresholdTracker(
        owner if owner is not None else Owner(),
        value="theta",
        steps="theta_steps",
        shape=shape,
        rate_field="rate",
        age="theta_age" if age else None,
        calibrated="theta_cal" if calibrated else None,
    )


def reference(taus: list[torch.Tensor], rate: float, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_t = theta_{t-1} + max(1/t, rate) (tau_t - theta_{t-1}) per element, t counting the finite
    taus of that element, element by element in plain Python floats."""
    n = int(torch.tensor(shape).prod()) if shape else 1
    theta, t = [0.0] * n, [0] * n
    for tau in taus:
        flat = tau.double().expand(shape).reshape(-1).tolist()
        for i, v in enumerate(flat):
            if not math.isfinite(v):
                continue
            t[i] += 1
            w = max(1.0 / t[i], rate)
            theta[i] = theta[i] + w * (v - theta[i])
    return torch.tensor(theta, dtype=torch.double).reshape(shape), torch.tensor(t).reshape(shape)


# --- budgets -------------------------------------------------------------------------------------


def test_smallest_working_batch_values():
    assert smallest_working_batch(0.5) == 2
    assert smallest_working_batch(0.3) == 4  # ceil(1 / 0.3) = 4
    assert smallest_working_batch(1.0) == 1
    assert smallest_working_batch(2.5) == 1  # k >= 1: one token is enough
    assert smallest_working_batch(1 / 3) == 3
    # 1/161 * 161 = 0.9999999999999999 in floating point: the loop adds the one token rounding lost
    k = 1 / 161
    assert math.floor(k * 161) == 0
    assert smallest_working_batch(k) == 162


def test_require_budget_passes_at_one_entry_and_names_the_fix_at_zero():
    require_budget(0.5, 2, "x")  # floor(0.5 * 2) = 1: enough
    require_budget(0.25, 4, "x")
    require_budget(3.0, 1, "x")
    with pytest.raises(ValueError) as err:
        require_budget(0.25, 3, "mutual_choice")  # floor(0.75) = 0
    assert str(err.value) == (
        "mutual_choice: k=0.25 with a batch of 3 token(s) gives a budget of floor(k * N) = 0 entries, so the "
        "batch would keep nothing (L0 0) and the selection threshold is undefined. Use a batch of at least 4 "
        "tokens (train_batch_size_tokens) or a larger k."
    )
    with pytest.raises(ValueError, match=r"k=0\.00621118 .* at least 162 tokens"):
        require_budget(1 / 161, 161, "feature_choice")


def test_tokens_in_counts_all_leading_dimensions():
    assert tokens_in(torch.zeros(5, 7)) == 5
    assert tokens_in(torch.zeros(2, 3, 7)) == 6
    assert tokens_in(torch.zeros(4, 1)) == 4  # d_in = 1
    assert tokens_in(torch.zeros(7)) == 1  # one token, no batch dimension
    assert tokens_in(torch.zeros(3, 0)) == 0  # d_in = 0: no division by zero


# --- the export guard ----------------------------------------------------------------------------


def test_check_exportable_accepts_finite_thresholds():
    assert check_exportable(torch.tensor(0.5), "theta") is None
    assert check_exportable(torch.tensor([0.0, -1.0, 1e30]), "theta") is None
    assert check_exportable(torch.zeros(0), "theta") is None


def test_check_exportable_scalar_names_the_value_and_the_fixes():
    for bad, shown in ((math.nan, "(nan)"), (math.inf, "(inf)"), (-math.inf, "(-inf)")):
        with pytest.raises(ValueError) as err:
            check_exportable(torch.tensor(bad, dtype=torch.double), "mutual_choice threshold theta")
        assert str(err.value) == (
            f"mutual_choice threshold theta is not finite {shown}: saving it as the JumpReLU threshold would "
            "make the saved model fire on nothing or everything. Train on batches with a non-zero budget "
            "(floor(k * N) >= 1), or fit the threshold on held-out activations with `sae-allocators "
            "calibrate` before saving."
        )  # one global threshold: no feature list


def test_check_exportable_vector_lists_the_first_five_bad_features():
    theta = torch.arange(10, dtype=torch.float32)
    theta[[2, 7]] = torch.tensor([math.inf, math.nan])
    with pytest.raises(ValueError) as err:
        check_exportable(theta, "theta_j")
    msg = str(err.value)
    assert msg.startswith("theta_j is not finite (inf) for 2 feature(s), e.g. [2, 7]: saving it")
    theta = torch.full((9,), math.nan)
    theta[0] = 1.0
    with pytest.raises(
        ValueError, match=r"^theta_j is not finite \(nan\) for 8 feature\(s\), e.g. \[1, 2, 3, 4, 5\]: "
    ):
        check_exportable(theta, "theta_j")
    grid = torch.zeros(2, 3)
    grid[1, 0] = -math.inf
    with pytest.raises(ValueError, match=r"not finite \(-inf\) for 1 feature\(s\), e.g. \[3\]"):
        check_exportable(grid, "theta_j")


def test_export_threshold_takes_the_shape_and_dtype_of_like_and_copies():
    like = torch.zeros(4, dtype=torch.float16)
    out = export_threshold(torch.tensor(0.75, dtype=torch.double), like, "theta")
    assert out.dtype == torch.float16 and out.shape == (4,) and out.tolist() == [0.75] * 4
    theta = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.double)
    out = export_threshold(theta, torch.zeros(4), "theta")
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.0, 3.0, 4.0]
    out.add_(1)  # its own storage: the tracker's buffer is untouched
    assert theta.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="^my theta is not finite"):
        export_threshold(torch.tensor([1.0, math.nan]), torch.zeros(2), "my theta")


# --- the tracker ---------------------------------------------------------------------------------


def test_tracker_registers_persistent_buffers_of_the_documented_types():
    owner = Owner(d_sae=6)
    tr = tracker(owner)
    assert tr.buffer_names == ("theta", "theta_steps", "theta_age", "theta_cal")
    state = owner.state_dict()
    assert {"theta", "theta_steps", "theta_age", "theta_cal"} <= set(state)
    assert owner.theta.dtype == torch.double and owner.theta.shape == (6,) and owner.theta.abs().sum() == 0
    assert owner.theta_steps.dtype == torch.long and owner.theta_steps.shape == (6,)
    assert owner.theta_age.dtype == torch.long and owner.theta_age.shape == (6,)
    assert owner.theta_cal.dtype == torch.bool and owner.theta_cal.shape == () and not bool(owner.theta_cal)
    assert tr.value is owner.theta and tr.steps is owner.theta_steps and tr.age is owner.theta_age
    assert not tr.is_calibrated and tr.rate == 0.25
    plain = tracker(Owner(), shape=(), age=False, calibrated=False)
    assert plain.buffer_names == ("theta", "theta_steps")
    assert plain.value.shape == () and not hasattr(plain.owner, "theta_age") and not hasattr(plain.owner, "theta_cal")
    assert not plain.is_calibrated
    with pytest.raises(AssertionError, match="no age buffer"):
        plain.age


def test_tracker_reuses_an_existing_buffer_of_the_same_shape_only():
    owner = Owner(d_sae=3)
    owner.register_buffer("theta", torch.tensor([1.5, 2.5, 3.5]))  # e.g. SAELens's topk_threshold
    owner.register_buffer("theta_steps", torch.ones(2))  # wrong shape: replaced by zeros
    tracker(owner, shape=(3,))
    assert owner.theta.dtype == torch.double and owner.theta.tolist() == [1.5, 2.5, 3.5]
    assert "theta" in owner.state_dict()
    assert owner.theta_steps.dtype == torch.long and owner.theta_steps.tolist() == [0, 0, 0]


def test_tracker_buffers_follow_the_owner_device():
    owner = Owner().to("meta")
    tr = tracker(owner)
    assert all(getattr(owner, n).device.type == "meta" for n in tr.buffer_names)


def test_update_is_a_running_mean_then_an_ema_per_element():
    owner = Owner(d_sae=4, rate=0.25)  # running mean for 4 updates, then weight 0.25
    tr = tracker(owner, shape=(4,))
    g = torch.Generator().manual_seed(0)
    taus = [torch.rand(4, generator=g) * 2 for _ in range(9)]
    taus[1][0] = math.inf  # feature 0 kept nothing: skipped
    taus[2][1] = math.nan
    taus[5][0] = -math.inf
    for t in taus:
        tr.update(t)
    ref, counts = reference(taus, 0.25, (4,))
    assert torch.allclose(owner.theta, ref, rtol=0, atol=1e-12)
    assert owner.theta_steps.tolist() == counts.tolist() == [7, 8, 9, 9]
    assert bool(torch.isfinite(owner.theta).all())
    # the first update of an element sets theta to tau exactly (weight 1)
    first = tracker(Owner(d_sae=2, rate=0.1), shape=(2,))
    first.update(torch.tensor([3.0, math.inf]))
    assert first.value.tolist() == [3.0, 0.0] and first.steps.tolist() == [1, 0]
    first.update(torch.tensor([5.0, 7.0]))
    assert first.value.tolist() == [4.0, 7.0]  # mean of 3 and 5; feature 1's first value


def test_update_weight_never_drops_below_the_rate():
    tr = tracker(Owner(rate=0.5), shape=())
    for v in (1.0, 1.0, 1.0, 9.0):  # running mean would give 3.0; the EMA floor 0.5 gives 5.0
        tr.update(torch.tensor(v))
    assert float(tr.value) == 5.0 and int(tr.steps) == 4


def test_scalar_tau_updates_every_feature_and_dtypes_are_converted():
    tr = tracker(Owner(d_sae=3, rate=0.1), shape=(3,))
    tr.update(torch.tensor(2.0, dtype=torch.float16))
    assert tr.value.dtype == torch.double and tr.value.tolist() == [2.0, 2.0, 2.0]
    assert tr.steps.tolist() == [1, 1, 1]
    tr.update(torch.tensor(math.inf))  # a step that kept nothing: every feature skipped
    assert tr.value.tolist() == [2.0, 2.0, 2.0] and tr.steps.tolist() == [1, 1, 1]


def test_update_counts_age_since_each_element_last_updated():
    tr = tracker(Owner(d_sae=3), shape=(3,))
    inf = math.inf
    for t in ([1.0, inf, inf], [inf, 1.0, inf], [inf, inf, inf]):
        tr.update(torch.tensor(t))
    assert tr.age.tolist() == [2, 1, 3]
    tr.update(torch.tensor([1.0, 1.0, 1.0]))
    assert tr.age.tolist() == [0, 0, 0]


def test_set_values_are_flagged_as_calibration_until_the_next_update():
    tr = tracker(Owner(d_sae=3), shape=(3,))
    tr.set_calibrated(torch.tensor(0.5))  # a global theta broadcasts to every feature
    assert tr.value.tolist() == [0.5, 0.5, 0.5] and tr.is_calibrated
    assert tr.steps.tolist() == [0, 0, 0]  # calibration is not a training update
    tr.set_calibrated(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32))
    assert tr.value.dtype == torch.double and tr.value.tolist() == [1.0, 2.0, 3.0]
    tr.update(torch.tensor([5.0, math.inf, 5.0]))
    assert not tr.is_calibrated and tr.value.tolist() == [5.0, 2.0, 5.0]
    with pytest.raises(ValueError, match=r"^calibrated threshold 'theta' is not finite \(nan\) for 1 feature"):
        tr.set_calibrated(torch.tensor([1.0, math.nan, 1.0]))
    assert tr.value.tolist() == [5.0, 2.0, 5.0] and not tr.is_calibrated  # refused: nothing written
    bare = tracker(Owner(d_sae=2), shape=(2,), calibrated=False)
    bare.set_calibrated(torch.tensor([0.25, 0.75]))
    assert bare.value.tolist() == [0.25, 0.75] and not bare.is_calibrated


def test_fold_divides_theta_only_with_decoder_norm_rescaling():
    rescaled = tracker(Owner(d_sae=2, rescale_acts_by_decoder_norm=True), shape=(2,))
    rescaled.set_calibrated(torch.tensor([3.0, 6.0]))
    rescaled.fold(3.0)
    assert rescaled.value.tolist() == [1.0, 2.0]
    for owner in (Owner(d_sae=2, rescale_acts_by_decoder_norm=False), Owner(d_sae=2)):  # off, or no such field
        plain = tracker(owner, shape=(2,))
        plain.set_calibrated(torch.tensor([3.0, 6.0]))
        plain.fold(3.0)
        assert plain.value.tolist() == [3.0, 6.0]


def test_metric_is_the_mean_threshold_at_the_time_it_was_taken():
    tr = tracker(Owner(d_sae=4), shape=(4,))
    tr.set_calibrated(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    metric = tr.metric()
    tr.set_calibrated(torch.tensor([100.0, 100.0, 100.0, 100.0]))  # later steps do not change it
    value = metric()
    assert isinstance(value, float) and value == 3.0
    assert tr.metric()() == 100.0


def test_exported_threshold_shape_dtype_and_default_name():
    tr = tracker(Owner(d_sae=3), shape=())
    tr.set_calibrated(torch.tensor(0.5))
    out = tr.exported(torch.zeros(3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.5, 0.5, 0.5]
    tr.value.fill_(math.inf)
    with pytest.raises(ValueError, match=r"^threshold 'theta' is not finite \(inf\): "):
        tr.exported(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^mutual_choice theta is not finite"):
        tr.exported(torch.zeros(3), "mutual_choice theta")


def test_update_runs_outside_compiled_graphs():
    """The update is wrapped by torch.compiler.disable (the compiled training step calls it eagerly)."""
    assert getattr(ThresholdTracker.update, "_torchdynamo_disable", False) is True

    def f(x):
        return x + 1

    wrapped = T._compiler_disable(f)
    assert wrapped is not f and getattr(wrapped, "_torchdynamo_disable", False) is True
    assert wrapped(torch.tensor(1.0)).item() == 2.0
    assert getattr(f, "_torchdynamo_disable", None) is None


def test_compiler_disable_falls_back_to_the_plain_function(monkeypatch):
    def f(x):
        return x * 2

    monkeypatch.delattr(torch, "compiler")
    assert T._compiler_disable(f) is f


# --- the config fields ---------------------------------------------------------------------------


def test_calibration_config_defaults_and_validation():
    cfg = CalibrationConfig()
    assert cfg.calibrate is True and cfg.calibration_tokens is None
    assert CalibrationConfig(calibrate=False, calibration_tokens=1).calibration_tokens == 1
    with pytest.raises(ValueError, match=r"^calibrate=1 is invalid: use True or False\.$"):
        CalibrationConfig(calibrate=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^calibrate='no' is invalid"):
        CalibrationConfig(calibrate="no")  # type: ignore[arg-type]
    for bad in (0, -5, True, 2.5, "100"):
        with pytest.raises(ValueError) as err:
            CalibrationConfig(calibration_tokens=bad)  # type: ignore[arg-type]
        assert str(err.value) == (
            f"calibration_tokens={bad!r} is invalid: use a positive number of tokens, or None for 2 % of the training tokens."
        )


def test_calibration_config_chains_the_next_post_init():
    seen = []

    @dataclasses.dataclass
    class Base:
        d_sae: int = 4

        def __post_init__(self):
            seen.append(self.d_sae)

    @dataclasses.dataclass
    class Cfg(CalibrationConfig, Base):
        pass

    Cfg(d_sae=7)
    assert seen == [7]
    with pytest.raises(ValueError, match="calibration_tokens"):
        Cfg(calibration_tokens=0)
    assert seen == [7]  # validated before the base's checks run


def test_update_after_the_owner_was_cast_to_float32_takes_tau_in_any_float_dtype():
    """``Module.to(torch.float32)`` (what casting a whole SAE does) turns theta into float32; each
    step's tau, in bfloat16 or float64, is still folded in (converted to theta's dtype; the step
    weight too), with the same running mean as in plain arithmetic."""
    owner = Owner(rate=0.25)
    tr = tracker(owner)
    owner.to(torch.float32)
    assert tr.value.dtype == torch.float32 and tr.steps.dtype == torch.long
    taus = [
        torch.full((6,), 2.0, dtype=torch.bfloat16),
        torch.arange(6, dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64),
    ]
    for tau in taus:
        tr.update(tau)
    want, steps = reference(taus, 0.25, (6,))
    assert tr.value.dtype == torch.float32
    torch.testing.assert_close(tr.value.double(), want, rtol=1e-6, atol=1e-6)
    assert tr.steps.tolist() == steps.tolist()

"""Weight schedules: the official train.py formula, ramps, stop_at, composition, bad input, and a
zero weight from a schedule skipping the teacher pass."""

from __future__ import annotations

import math

import pytest
import torch

from sra_plugin import SelfRepresentationAlignment, schedules
from sra_plugin.schedules import cosine, linear, paper, stop_at
from tests._models import flow_batch, optimizer_step, tiny_sit


def official(epoch: int, resolution: int) -> float:
    """The weight of the official SRA train.py, written out per resolution."""
    if resolution == 256:
        return 0.2 if epoch <= 149 else 2 * 0.1 ** ((epoch - 149) / 1000 + 1)
    return 0.2 if epoch <= 99 else 2 * 0.1 ** ((epoch - 99) / 800 + 1)


@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("epoch", [0, 99, 100, 101, 149, 150, 151, 1149, 2000])
def test_paper_equals_official_formula(resolution, epoch):
    steps_per_epoch = 37
    schedule = paper(steps_per_epoch, resolution=resolution)
    for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):  # first and last step of the epoch
        assert schedule(step) == pytest.approx(official(epoch, resolution), rel=1e-12, abs=0)


def test_paper_decays_tenfold_per_decay_period():
    assert paper(1)(1149) == pytest.approx(0.02, rel=1e-12)
    assert paper(1, resolution=512)(899) == pytest.approx(0.02, rel=1e-12)
    assert paper(1)(150) < 0.2 and paper(1, resolution=512)(100) < 0.2
    assert paper(1, resolution=512)(149) < paper(1)(149) == 0.2


def test_paper_uses_whole_epochs():
    schedule = paper(10)
    assert schedule(1500) == schedule(1509) == pytest.approx(official(150, 256))  # epoch 150, not step 1509 / 10
    assert schedule(1499) == 0.2  # epoch 149: still the full weight
    assert schedule(1510) == pytest.approx(official(151, 256)) != schedule(1509)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ramps_endpoints_constant_outside_and_midpoint(kind):
    ramp = getattr(schedules, kind)(0.1, 0.5, 100, 300)
    for step in (0, 50, 100):
        assert ramp(step) == pytest.approx(0.1)
    for step in (300, 301, 10_000):
        assert ramp(step) == pytest.approx(0.5)
    assert ramp(200) == pytest.approx(0.3)  # halfway for both shapes
    values = [ramp(s) for s in range(100, 301)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising in between


def test_linear_and_cosine_quarter_points():
    assert linear(0.0, 1.0, 0, 100)(25) == pytest.approx(0.25)
    assert cosine(0.0, 1.0, 0, 100)(25) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert linear(1.0, 0.0, 0, 100)(75) == pytest.approx(0.25)  # decreasing works too
    assert cosine(1.0, 0.0, 0, 100)(75) == pytest.approx(1 - (1 - math.cos(3 * math.pi / 4)) / 2)


def test_stop_at_wraps_numbers_tensors_and_schedules():
    assert [stop_at(3, 0.5)(s) for s in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    fixed = torch.tensor(0.25)
    assert stop_at(2, fixed)(1) is fixed and stop_at(2, fixed)(2) == 0.0
    wrapped = stop_at(1000, paper(1))
    assert wrapped(999) == pytest.approx(official(999, 256)) and wrapped(999) < 0.2
    assert wrapped(1000) == 0.0 and isinstance(wrapped(1000), float)  # exactly 0.0: the teacher pass is skipped
    assert stop_at(5, lambda step: 0.1 * step)(4) == pytest.approx(0.4)


def test_composition_multiplies_step_by_step():
    warm_paper = linear(0.0, 1.0, 0, 10) * paper(1)
    assert warm_paper(5) == pytest.approx(0.5 * 0.2)
    assert warm_paper(1200) == pytest.approx(official(1200, 256))
    assert (2 * cosine(0.0, 0.5, 0, 10))(10) == pytest.approx(1.0)
    nested = stop_at(20, linear(0.0, 1.0, 0, 10) * paper(1))
    assert nested(10) == pytest.approx(0.2) and nested(20) == 0.0


def test_reprs_read_as_code():
    assert repr(paper(5005)) == "paper(steps_per_epoch=5005, resolution=256)"
    assert repr(linear(0, 0.5, 10, 20)) == "linear(start=0.0, end=0.5, begin_step=10, end_step=20)"
    assert repr(stop_at(100, paper(10, 512))) == "stop_at(100, paper(steps_per_epoch=10, resolution=512))"
    assert repr(cosine(1, 0, 0, 5) * 0.5) == "cosine(start=1.0, end=0.0, begin_step=0, end_step=5) * 0.5"


@pytest.mark.parametrize(
    "build, error, words",
    [
        (lambda: paper(0), ValueError, ["steps_per_epoch=0", ">= 1"]),
        (lambda: paper(2.5), TypeError, ["steps_per_epoch=2.5", "integer"]),
        (lambda: paper(10, resolution=384), ValueError, ["resolution=384", "256", "512"]),
        (lambda: linear(-0.1, 0.2, 0, 10), ValueError, ["start=-0.1", ">= 0"]),
        (lambda: cosine(0.1, float("nan"), 0, 10), ValueError, ["end=nan", "finite"]),
        (lambda: linear(0.1, 0.2, 10, 10), ValueError, ["end_step=10", "begin_step=10"]),
        (lambda: cosine(0.1, 0.2, -1, 10), ValueError, ["begin_step=-1", ">= 0"]),
        (lambda: stop_at(-5, 0.2), ValueError, ["step=-5", ">= 0"]),
        (lambda: stop_at(5, "paper"), TypeError, ["weight='paper'", "callable"]),
        (lambda: stop_at(5, torch.ones(2)), ValueError, ["weight=", "0-dim"]),
        (lambda: paper(10) * "x", TypeError, ["other='x'", "callable"]),
        (lambda: paper(10)(-1), ValueError, ["step=-1", ">= 0"]),
        (lambda: paper(10)(1.5), TypeError, ["step=1.5", "integer"]),
    ],
)
def test_bad_input_names_argument_value_and_accepted(build, error, words):
    with pytest.raises(error) as info:
        build()
    for word in words:
        assert word in str(info.value)


class CallCounter:
    def __init__(self, modules):
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.count += 1


def test_zero_weight_from_a_schedule_runs_no_teacher_block():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, weight=stop_at(1, paper(1)))
    teacher = CallCounter(list(sra.teacher.blocks))
    x_t, x_s, t, s, y, _ = flow_batch()

    model(x_t, t, y)
    loss = sra(model, x_t, x_s, t, s, y)
    assert teacher.count == 4 and loss.item() > 0 and sra.metrics["weight"] == 0.2
    loss.backward()
    optimizer_step(model)
    sra.update_teacher()

    model(x_t, t, y)
    loss = sra(model, x_t, x_s, t, s, y)
    assert teacher.count == 4  # step 1: weight 0.0, no teacher block ran
    assert loss.item() == 0.0 and sra.metrics["weight"] == 0.0
    loss.backward()  # still a graph (the head stays in it)

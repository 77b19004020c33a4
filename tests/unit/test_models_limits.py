"""TaskSpec's per-task limits: bounds, types, presets and defaults (SPEC "Security model")."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from octaskly.domain import models
from octaskly.protocol import messages

BOUNDS = {
    "cpu_seconds": (1, 86400),
    "memory_limit_mb": (64, 16 * 1024 * 1024),
    "disk_limit_mb": (100, 1024 * 1024 * 1024),
    "open_files_limit": (64, 1024 * 1024),
    "process_limit": (4, 4 * 1024 * 1024),
}


def spec(**fields: Any) -> models.TaskSpec:
    return models.TaskSpec.model_validate({"command": "true", **fields})


def error_of(**fields: Any) -> tuple[str, str]:
    with pytest.raises(pydantic.ValidationError) as caught:
        spec(**fields)
    first = caught.value.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


@pytest.mark.parametrize("field", BOUNDS)
def test_each_limit_takes_its_bounds(field: str) -> None:
    low, high = BOUNDS[field]
    assert getattr(spec(**{field: low}), field) == low
    assert getattr(spec(**{field: high}), field) == high
    assert getattr(spec(), field) is None  # unset: the preset's or the default applies


@pytest.mark.parametrize("field", BOUNDS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("below", "greater than or equal to"),
        ("above", "less than or equal to"),
        (-1, "greater than or equal to"),
        (10**30, "less than or equal to"),
        (2.5, "valid integer"),
        (float("inf"), "finite number"),
        (float("nan"), "finite number"),
        ("lots", "valid integer"),
        ("", "valid integer"),
        ([100], "valid integer"),
        ({"value": 100}, "valid integer"),
        (True, "not a boolean"),
        (False, "not a boolean"),
    ],
)
def test_hostile_limits_are_clear_validation_errors(field: str, value: Any, message: str) -> None:
    low, high = BOUNDS[field]
    if value == "below":
        value = low - 1
    elif value == "above":
        value = high + 1
    where, msg = error_of(**{field: value})
    assert where == field
    assert message in msg


def test_unknown_presets_and_fields_are_refused() -> None:
    assert error_of(limits_preset="paranoid")[0] == "limits_preset"
    assert error_of(limits_preset=1)[0] == "limits_preset"
    assert error_of(max_processes=10) == ("max_processes", "Extra inputs are not permitted")


def test_presets_and_defaults_are_the_specs() -> None:
    assert spec().limits() == models.Limits(
        cpu_seconds=3600,
        memory_limit_mb=2048,
        disk_limit_mb=10000,
        open_files_limit=1024,
        process_limit=256,
    )
    assert spec(limits_preset="strict").limits() == models.Limits(
        cpu_seconds=300,
        memory_limit_mb=512,
        disk_limit_mb=1000,
        open_files_limit=100,
        process_limit=10,
    )
    assert spec(limits_preset="relaxed").limits() == models.Limits(
        cpu_seconds=86400,
        memory_limit_mb=8192,
        disk_limit_mb=102400,
        open_files_limit=4096,
        process_limit=1024,
    )


def test_the_tasks_own_limits_override_its_preset() -> None:
    limits = spec(limits_preset="strict", process_limit=50, memory_limit_mb=64).limits()
    assert (limits.process_limit, limits.memory_limit_mb, limits.cpu_seconds) == (50, 64, 300)


@pytest.mark.parametrize("preset", [None, *models.LimitsPreset])
def test_every_preset_is_within_the_bounds(preset: models.LimitsPreset | None) -> None:
    limits = models.DEFAULT_LIMITS if preset is None else models.PRESETS[preset]
    for field, (low, high) in BOUNDS.items():
        assert low <= getattr(limits, field) <= high


def test_a_spec_with_limits_round_trips_through_json_and_the_assignment() -> None:
    original = spec(limits_preset="relaxed", process_limit=64, open_files_limit=256)
    again = models.TaskSpec.model_validate_json(original.model_dump_json())
    assert again == original
    assignment = messages.TaskAssignment(
        task_id="t",
        attempt=1,
        command="true",
        env={},
        timeout=1,
        open_files_limit=again.open_files_limit,
        process_limit=again.process_limit,
        limits_preset=again.limits_preset,
    )
    raw = messages.to_wire(messages.Assign(task=assignment))
    assert raw["task"]["limits_preset"] == "relaxed" and raw["task"]["process_limit"] == 64
    parsed = messages.parse_dispatcher_message(raw)
    assert isinstance(parsed, messages.Assign) and parsed.task == assignment

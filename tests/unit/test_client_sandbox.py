"""The minimum sandbox level of client tasks and the workers' sandbox report, as tables:
the spec held to a minimum, the hello's report on the wire, and what the dispatcher makes
of a report (or of its absence)."""

from __future__ import annotations

import pytest

from octaskly import errors
from octaskly.domain import models
from octaskly.protocol import messages
from octaskly.services import peering
from tests.unit.test_protocol import hello_frame

Level = models.SandboxLevel
NONE, BASIC, STRICT, VERY = Level.NONE, Level.BASIC, Level.STRICT, Level.VERY_STRICT


@pytest.mark.parametrize(
    ("asked", "minimum", "stored"),
    [
        (None, STRICT, STRICT),  # no level: the minimum, stored in the spec
        (STRICT, STRICT, STRICT),
        (VERY, STRICT, VERY),  # more than the minimum is always fine
        (None, BASIC, BASIC),
        (NONE, NONE, NONE),
        (None, VERY, VERY),
    ],
)
def test_a_spec_is_held_to_the_minimum(
    asked: models.SandboxLevel | None, minimum: models.SandboxLevel, stored: models.SandboxLevel
) -> None:
    spec = models.TaskSpec(command="true", sandbox_level=asked)
    held = spec.with_min_sandbox_level(minimum)
    assert held.sandbox_level is stored
    assert held.model_dump(exclude={"sandbox_level"}) == spec.model_dump(exclude={"sandbox_level"})
    # the level is in the JSON the store keeps (and the standby replicates)
    assert f'"sandbox_level":"{stored.value}"' in held.model_dump_json()


@pytest.mark.parametrize(
    ("asked", "minimum"), [(NONE, STRICT), (BASIC, STRICT), (STRICT, VERY), (NONE, BASIC)]
)
def test_a_spec_asking_for_less_than_the_minimum_is_refused(
    asked: models.SandboxLevel, minimum: models.SandboxLevel
) -> None:
    spec = models.TaskSpec(command="true", sandbox_level=asked)
    with pytest.raises(ValueError, match=rf"{asked.value} is below {minimum.value}"):
        spec.with_min_sandbox_level(minimum)


def test_the_sandbox_report_travels_in_the_hello() -> None:
    hello = messages.Hello.model_validate(
        hello_frame(sandbox_unavailable={"very-strict": "no network namespace"})
    )
    assert hello.sandbox_unavailable == {VERY: "no network namespace"}
    wire = messages.to_wire(hello)
    assert wire["sandbox_unavailable"] == {"very-strict": "no network namespace"}
    assert messages.parse_worker_message(wire) == hello
    assert messages.Hello.model_validate(hello_frame()).sandbox_unavailable is None


@pytest.mark.parametrize(
    "report",
    [
        {"paranoid": "x"},  # not a level
        {"STRICT": "x"},
        {"strict": 1},
        {"strict": "x" * 1001},
        ["strict"],
        "strict",
    ],
)
def test_a_bad_sandbox_report_is_a_protocol_error(report: object) -> None:
    with pytest.raises(errors.ProtocolError, match="sandbox_unavailable"):
        messages.parse_worker_message(hello_frame(sandbox_unavailable=report))


@pytest.mark.parametrize(
    ("level", "report", "available", "unavailable"),
    [
        ("basic", {}, [BASIC, STRICT, VERY], {}),
        ("basic", {"strict": "no bwrap", "very-strict": "no bwrap"}, [BASIC], [STRICT, VERY]),
        ("none", {"very-strict": "no netns"}, [NONE, BASIC, STRICT], [VERY]),
        ("strict", {}, [STRICT, VERY], {}),
        # levels below the worker's own do not matter: no run there gets them
        ("strict", {"basic": "odd"}, [STRICT, VERY], {}),
        # no report (a hand-written or trimmed hello): only the worker's own level
        ("basic", None, [BASIC], [STRICT, VERY]),
        ("strict", None, [STRICT], [VERY]),
        ("very-strict", None, [VERY], {}),
    ],
)
def test_what_the_dispatcher_makes_of_a_report(
    level: str,
    report: dict[str, str] | None,
    available: list[models.SandboxLevel],
    unavailable: list[models.SandboxLevel],
) -> None:
    hello = messages.Hello.model_validate(
        hello_frame(sandbox_level=level, sandbox_unavailable=report)
    )
    boxes = peering.sandboxes(hello)
    assert boxes.available() == available
    assert sorted(boxes.unavailable, key=lambda lv: lv.rank) == list(unavailable)
    if report is None:
        for reason in boxes.unavailable.values():
            assert f"not reported by this worker (only its own level, {level}" in reason

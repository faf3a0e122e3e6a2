"""Predictive recovery on synthetic histories, with the clock handed in (no sleeping): a session
silent past its project's learned p99 is flagged with an explanation; too little history means
no prediction; "shorten" never goes below the floor or past the timeout, and fires once; a
heartbeat clears the flag."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import protocol as p
from agent.journal import SilenceKind
from agent.predict import SilenceModel, span
from tests.unitrig import T0, UnitRig

PROJECT = 3


def history(rig: UnitRig, gaps: int, *, project: int | None = PROJECT, first_todo: int = 100):
    """``gaps`` past silences of 30..170 s, spread over past todos of ``project``."""
    rng = random.Random(7)
    todos = list(range(first_todo, first_todo + 20))
    with rig.journal.transaction() as db:
        for n in range(gaps):
            seconds = 30 + 140 * rng.random()
            rig.journal.record_silence(db, todos[n % 20], SilenceKind.GAP, seconds, T0 - 86400)
    if project is not None:
        rig.journal.set_projects(dict.fromkeys(todos, project))


@pytest.fixture
def rig(tmpdir_short: Path) -> Iterator[UnitRig]:
    r = UnitRig(tmpdir_short)
    yield r
    r.close()


@pytest.fixture
def shorten(tmpdir_short: Path) -> Iterator[UnitRig]:
    r = UnitRig(tmpdir_short, {"predict": {"act": "shorten", "min_timeout": 300}})
    yield r
    r.close()


def predicted(rig: UnitRig) -> tuple[str, str, list[int]]:
    check = rig.check("predicted_hangs")
    assert check is not None
    return check


def test_heartbeats_and_completions_become_samples(rig: UnitRig) -> None:
    rig.start(1, T0)
    rig.heartbeat(1, T0 + 40)
    rig.heartbeat(1, T0 + 100)
    rig.complete(1, T0 + 130)
    samples = [(s.kind, s.seconds) for s in rig.journal.silences_after(0)]
    assert samples == [
        ("gap", 40.0),
        ("gap", 60.0),
        ("duration", 130.0),
        ("gap", 30.0),
    ]
    # A finished todo's later heartbeat (a stray hook event) is no gap of a live session.
    rig.heartbeat(1, T0 + 500)
    assert len(rig.journal.silences_after(0)) == 4


def test_a_session_silent_past_its_projects_p99_is_flagged_and_explained(rig: UnitRig) -> None:
    history(rig, 412)
    rig.journal.set_projects({7: PROJECT})
    rig.start(7, T0)
    rig.run(T0 + 100)
    assert predicted(rig)[0] == "OK"
    rig.run(T0 + 432)
    status, message, ids = predicted(rig)
    assert (status, ids) == ("WARNING", [7])
    assert message == (
        "todo 7: silent 7 min 12 s; 99 % of 412 past gaps in project 3 were under 3 min"
    )
    # status TODO shows the same sentence; health lists the check.
    report = rig.intake.status(p.Status(todo_id=7), T0 + 432)
    assert report.todo is not None
    assert report.todo.predicted_hang == (
        "silent 7 min 12 s; 99 % of 412 past gaps in project 3 were under 3 min"
    )
    health = rig.intake.health(T0 + 432)
    [check] = [c for c in health.checks if c.name == "predicted_hangs"]
    assert check.status == "WARNING" and check.todo_ids == [7]
    # "warn" only: the deadline is the configured one, untouched.
    assert rig.journal.timers(7)[0].completion_due == T0 + 600
    assert rig.entries(7, "emergency") == []


def test_too_little_history_means_no_prediction(rig: UnitRig) -> None:
    history(rig, 49)
    rig.start(7, T0)
    rig.run(T0 + 3000)  # silent far longer than any gap seen, and still no prediction
    status, message, ids = predicted(rig)
    assert (status, ids) == ("OK", [])
    assert "no prediction yet: 49 of 50 gaps needed" in message


def test_a_project_with_little_history_falls_back_to_all_projects(rig: UnitRig) -> None:
    history(rig, 30, project=PROJECT)
    history(rig, 30, project=4, first_todo=200)
    rig.journal.set_projects({7: PROJECT})
    rig.start(7, T0)
    rig.run(T0 + 400)
    status, message, _ = predicted(rig)
    assert status == "WARNING"
    assert "99 % of 60 past gaps overall were under 3 min" in message


def test_a_heartbeat_clears_the_flag(rig: UnitRig) -> None:
    history(rig, 200)
    rig.start(7, T0)
    rig.run(T0 + 400)
    assert predicted(rig)[2] == [7]
    rig.heartbeat(7, T0 + 410)
    rig.run(T0 + 411)
    assert predicted(rig)[:1] == ("OK",)
    assert rig.journal.timers(7)[0].completion_due == T0 + 410 + 600


def test_sessions_running_past_their_usual_length_are_flagged(rig: UnitRig) -> None:
    with rig.journal.transaction() as db:
        for n in range(60):
            rig.journal.record_silence(db, 100 + n, SilenceKind.DURATION, 1200 + n * 10, T0 - 1)
    rig.start(7, T0)
    for at in range(60, 1900, 60):  # a chatty session: heartbeats every minute
        rig.heartbeat(7, T0 + at)
    rig.run(T0 + 1900)
    status, message, ids = predicted(rig)
    assert (status, ids) == ("WARNING", [7])
    assert (
        "todo 7: running 31 min 40 s; 99 % of 60 past sessions overall finished within" in message
    )


def test_shorten_brings_the_deadline_forward_to_the_floor_and_fires_once(
    shorten: UnitRig,
) -> None:
    rig = shorten
    history(rig, 412)
    rig.start(7, T0)
    rig.run(T0 + 200)  # past p99 (~3 min): flagged, deadline moved to the floor, not to p99
    assert predicted(rig)[2] == [7]
    assert rig.journal.timers(7)[0].completion_due == T0 + 300
    rig.run(T0 + 299)
    assert rig.entries(7, "emergency") == []
    rig.run(T0 + 300)
    [emergency] = rig.entries(7, "emergency")
    assert "predicted hang" in emergency.reason and "predict.act = shorten" in emergency.reason
    for at in (T0 + 301, T0 + 600, T0 + 601, T0 + 900):
        rig.run(at)
    assert len(rig.entries(7, "emergency")) == 1  # never twice, not again at the old deadline
    assert rig.journal.counters()["deadline_emergencies"] == 1


def test_shorten_never_moves_a_deadline_later_than_the_configured_timeout(
    tmpdir_short: Path,
) -> None:
    rig = UnitRig(tmpdir_short, {"predict": {"act": "shorten", "min_timeout": 900}})
    try:
        history(rig, 412)
        rig.start(7, T0)
        rig.run(T0 + 200)
        assert predicted(rig)[2] == [7]
        assert rig.journal.timers(7)[0].completion_due == T0 + 600  # the floor is past it
    finally:
        rig.close()


def test_shorten_does_not_fight_a_heartbeat(shorten: UnitRig) -> None:
    rig = shorten
    history(rig, 412)
    rig.start(7, T0)
    rig.run(T0 + 200)
    assert rig.journal.timers(7)[0].completion_due == T0 + 300
    rig.heartbeat(7, T0 + 250)  # the session speaks up: the full timeout from now
    assert rig.journal.timers(7)[0].completion_due == T0 + 250 + 600
    # A shortening decided on what the monitor saw before that heartbeat is refused.
    assert not rig.journal.shorten_deadline(7, expected_due=T0 + 300, heard_at=T0, new_due=T0 + 300)
    rig.run(T0 + 300)
    assert rig.entries(7, "emergency") == []


def test_prediction_off_is_reported_as_off(tmpdir_short: Path) -> None:
    rig = UnitRig(tmpdir_short, {"predict": {"enabled": False}})
    try:
        history(rig, 412)
        rig.start(7, T0)
        rig.run(T0 + 1000)
        assert predicted(rig)[:2] == ("OK", "predictive recovery is off")
    finally:
        rig.close()


def test_the_model_rebuilds_when_a_project_turns_up_late(rig: UnitRig) -> None:
    history(rig, 60, project=None)
    model = SilenceModel()
    model.update(rig.journal)
    assert model.threshold("gap", PROJECT, 0.99, 50) is not None
    assert model.threshold("gap", PROJECT, 0.99, 50)[2] == "overall"
    rig.journal.set_projects(dict.fromkeys(range(100, 120), PROJECT))
    model.update(rig.journal)
    assert model.threshold("gap", PROJECT, 0.99, 50)[2] == "project 3"
    assert model.count("gap") == 60


def test_spans_read_like_a_person_wrote_them() -> None:
    assert span(432) == "7 min 12 s"
    assert span(168.4, up=True) == "3 min"
    assert span(45.2, up=True) == "46 s"
    assert span(2 * 3600 + 5 * 60) == "2 h 5 min"


def test_a_long_history_is_learned_in_bounded_passes_before_anything_is_predicted(
    rig: UnitRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.predict

    monkeypatch.setattr(agent.predict, "FEED_PER_PASS", 150)
    history(rig, 412)
    rig.start(7, T0)
    assert rig.run(T0 + 432) <= T0 + 432 + 0.25  # not caught up: the monitor comes back soon
    assert rig.check("predicted_hangs") is None  # nothing said on a partial history
    rig.run(T0 + 432.5)
    rig.run(T0 + 433)
    status, message, ids = predicted(rig)
    assert (status, ids) == ("WARNING", [7])
    assert "of 412 past gaps" in message


def test_list_marks_a_predicted_hang_and_a_pending_schedule(rig: UnitRig) -> None:
    history(rig, 412)
    rig.start(7, T0)
    rig.start(8, T0)
    rig.heartbeat(8, T0 + 430)
    rig.send(p.Schedule(request_id="s8", todo_id=8, due_at=T0 + 3600), T0 + 430)
    rig.run(T0 + 432)
    listing = rig.intake.list_todos(p.ListTodos(), T0 + 432)
    by_id = {t.todo_id: t for t in listing.todos}
    # Todo 8's heartbeat was a 413th gap; todo 7's project is not known here: all projects.
    assert by_id[7].predicted_hang == (
        "silent 7 min 12 s; 99 % of 413 past gaps overall were under 3 min"
    )
    assert by_id[7].scheduled_at is None
    assert by_id[8].predicted_hang is None
    assert by_id[8].scheduled_at == T0 + 3600

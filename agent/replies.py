"""What intake answers: an outcome (the reply and which children to wake), a refusal, and
the errors for a journal that could not record a batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import protocol as p


class Refusal(Exception):
    """A request that is refused whole: nothing of it is journaled."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Outcome:
    reply: p.Reply
    ring: set[str] = field(default_factory=set)


def ack(
    request: p.Request, todo_id: int | None, completion_id: str | None = None, **kw: Any
) -> p.Ack:
    return p.Ack(
        request_id=request.request_id,
        state="accepted",
        todo_id=todo_id,
        completion_id=completion_id,
        **kw,
    )


def unavailable(exc: Exception, state_dir: str) -> p.Error:
    if "locked" in str(exc):  # SQLITE_BUSY: a child stopped or starved inside a transaction
        remedy = "try again shortly; if it persists, see agent.log for a stuck child process"
    else:
        remedy = f"free space in {state_dir}"
    return p.Error(
        code=p.ErrorCode.UNAVAILABLE,
        message=f"completiond could not record the request in its journal ({exc}); it was NOT "
        f"taken: {remedy} (the client queues it in the outbox if it can)",
    )


def internal(message: str) -> p.Error:
    return p.Error(code=p.ErrorCode.INTERNAL, message=f"internal error: {message}; see agent.log")


F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Methods by the request type they take: ``@registry(p.Start)`` on a method registers it."""

    def __init__(self) -> None:
        self.by_type: dict[type[p.Request], Callable[..., Any]] = {}

    def __call__(self, kind: type[p.Request]) -> Callable[[F], F]:
        def register(method: F) -> F:
            self.by_type[kind] = method
            return method

        return register

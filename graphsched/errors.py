"""Exceptions and warnings raised by graphsched; every message names the fix."""

from __future__ import annotations


class GraphschedError(RuntimeError):
    """Base class of every error graphsched raises on purpose."""


class ConfigError(GraphschedError, ValueError):
    """A configuration value is out of range or inconsistent."""


class PlanError(GraphschedError):
    """A plan does not fit the graph it is applied to (missing nodes, not topological, ...)."""


class UnwaitedCollectiveError(GraphschedError):
    """A captured graph reads a collective's result before its wait: running it as captured would
    give timing-dependent numbers, so there is no safe fallback."""


class PlanMismatchError(GraphschedError):
    """Ranks hold different plans; running them would deadlock the collectives."""


class ProcessGroupMismatchError(GraphschedError):
    """The wrapped model is called under other process groups than it was captured with."""


class GraphschedFallbackWarning(UserWarning):
    """A graph could not be scheduled and runs unscheduled (same numerics as eager)."""


class AgreementTimeoutError(GraphschedError):
    """Another rank showed no sign of life while this rank waited for it to agree on a plan."""


def graphsched_cause(exc: BaseException) -> "GraphschedError | None":
    """The GraphschedError that ``exc`` wraps (Dynamo wraps errors raised inside a backend)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, GraphschedError):
            return e
        todo += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return None

"""The scheduling problem: tasks on two in-order resources, and the schedule that answers it.

A task runs on one resource, ``compute`` (the compute stream) or ``comm`` (a collective's transfer
on the communication stream). The runtime issues all tasks in one global list order and each
resource runs its own tasks in that order, one at a time; a task starts once its resource is free
and all its dependencies have finished. A schedule is therefore a topological order of the tasks,
and its times follow from simulating the two resources (see ``simulate.py``).

``issues_follow_compute``: a collective is launched from the compute stream and starts only after
every compute task listed before it has ended, not only its dependencies. That is how inductor's
code runs (a functional collective is called on the current stream, and the communication stream
waits for all of that stream's work up to the call), and NCCL called from the compute stream. The
aten executor launches each collective on its own stream behind its inputs' events alone, which is
the default model. Under inductor's model the place of an issue in the order matters: listed after
an unrelated compute task, the transfer waits for it.

The resources are not quite independent: a transfer in flight takes memory bandwidth (and, for
NCCL, SMs) from the compute beside it. ``ScheduleProblem.contention`` is that slowdown: a compute
task runs ``contention`` times longer for the part of it that overlaps a comm task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from graphsched.analysis.graph import ordered_topological_sort
from graphsched.errors import GraphschedError, PlanError

COMPUTE = "compute"
COMM = "comm"
RESOURCES = (COMPUTE, COMM)

#: Tag of a weight-gradient task: nothing on the input-gradient chain waits for it, so it may be
#: moved into any communication window it has no path to.
WEIGHT_GRAD = "weight_grad"
#: Tag of a collective's transfer.
COLLECTIVE = "collective"


class ProblemError(GraphschedError, ValueError):
    """A scheduling problem is malformed (duplicate ids, unknown dependency, cycle, ...)."""


class OrderError(PlanError, ValueError):
    """An order is not a topological permutation of the problem's tasks."""


@dataclass(frozen=True)
class SchedTask:
    id: str
    resource: str
    duration: float
    deps: tuple[str, ...] = ()
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Accept lists and sets from callers but keep the task hashable and immutable.
        if not isinstance(self.deps, tuple):
            object.__setattr__(self, "deps", tuple(self.deps))
        if not isinstance(self.tags, frozenset):
            object.__setattr__(self, "tags", frozenset(self.tags))


@dataclass
class Schedule:
    """An order of all tasks with its simulated times.

    ``method`` names what produced the order (``list:critical_path``, ``list:as_captured``,
    ``ilp``, ``window_ilp``, ...). ``status`` is ``optimal`` (proven: the solver proved it or the
    makespan meets the lower bound), ``feasible`` (a solver improved on the incumbent without a
    proof, e.g. it hit its time limit), ``incumbent`` (a solver ran but found nothing better than
    the schedule it was given) or ``heuristic`` (no solver ran).
    """

    order: list[str]
    start: dict[str, float]
    end: dict[str, float]
    makespan: float
    method: str
    status: str
    solve_time_s: float


@dataclass
class ScheduleProblem:
    """A validated set of tasks. Do not mutate ``tasks`` after construction: derived data
    (topological order, path lengths) is computed once here.

    ``contention`` (>= 1): compute runs that many times slower while a comm task is in flight
    (1.0, the default: not at all). Durations, path lengths and the lower bound are those of the
    tasks alone; only the simulator stretches compute, so every bound here stays a bound.
    """

    tasks: list[SchedTask]
    #: Collectives start behind every compute task listed before them (see the module doc).
    issues_follow_compute: bool = False
    contention: float = 1.0
    _by_id: dict[str, SchedTask] = field(init=False, repr=False, compare=False)
    _children: dict[str, list[str]] = field(init=False, repr=False, compare=False)
    _topo: list[str] = field(init=False, repr=False, compare=False)
    _pos: dict[str, int] = field(init=False, repr=False, compare=False)
    _tail: dict[str, float] = field(init=False, repr=False, compare=False)
    _head: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        c = self.contention
        if not isinstance(c, (int, float)) or not (math.isfinite(c) and c >= 1.0):
            raise ProblemError(
                f"contention={c!r} must be a finite number >= 1.0 (1.0: a collective in flight "
                "does not slow compute; 1.1: compute beside one runs 10% slower)."
            )
        self._by_id = {}
        for t in self.tasks:
            if not isinstance(t, SchedTask):
                raise ProblemError(
                    f"{t!r} is not a SchedTask; build tasks with "
                    "SchedTask(id, resource, duration, deps, tags)."
                )
            if t.id in self._by_id:
                raise ProblemError(f"task id {t.id!r} appears twice; give every task its own id.")
            if t.resource not in RESOURCES:
                raise ProblemError(
                    f"task {t.id!r}: resource {t.resource!r} is not one of {RESOURCES}; "
                    "put compute on 'compute' and collective transfers on 'comm'."
                )
            d = t.duration
            if not isinstance(d, (int, float)) or math.isnan(d) or math.isinf(d) or d < 0:
                raise ProblemError(
                    f"task {t.id!r}: duration {d!r} must be a finite number >= 0 (seconds); "
                    "use 0 for waits and views."
                )
            self._by_id[t.id] = t
        self._children = {t.id: [] for t in self.tasks}
        for t in self.tasks:
            if len(set(t.deps)) != len(t.deps):
                raise ProblemError(
                    f"task {t.id!r} lists a dependency twice: {t.deps}; list each once."
                )
            for d in t.deps:
                if d not in self._by_id:
                    raise ProblemError(
                        f"task {t.id!r} depends on unknown task {d!r}; add that task to the "
                        "problem or drop the dependency."
                    )
                if d == t.id:
                    raise ProblemError(f"task {t.id!r} depends on itself; drop that dependency.")
                self._children[d].append(t.id)
        self._topo = self._stable_topological_order()
        self._pos = {tid: i for i, tid in enumerate(self._topo)}
        self._tail = {}
        for tid in reversed(self._topo):
            kids = self._children[tid]
            self._tail[tid] = self._by_id[tid].duration + max(
                (self._tail[c] for c in kids), default=0.0
            )
        self._head = {}
        for tid in self._topo:
            task = self._by_id[tid]
            self._head[tid] = max(
                (self._head[d] + self._by_id[d].duration for d in task.deps), default=0.0
            )

    def _stable_topological_order(self) -> list[str]:
        # Kahn's algorithm that always takes the earliest-listed ready task, so a list that is
        # already topological comes back unchanged ("as captured").
        index = {t.id: i for i, t in enumerate(self.tasks)}
        order = ordered_topological_sort(index, self._children.__getitem__, index.__getitem__)
        if len(order) != len(self.tasks):
            placed = set(order)
            stuck = sorted(tid for tid in index if tid not in placed)
            raise ProblemError(
                f"the dependencies form a cycle through some of {stuck[:10]}; "
                "a schedule needs an acyclic task graph, so break the cycle."
            )
        return order

    # -- read-only views -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tasks)

    def task(self, tid: str) -> SchedTask:
        return self._by_id[tid]

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.tasks]

    def children(self, tid: str) -> list[str]:
        return list(self._children[tid])

    def topological_order(self) -> list[str]:
        """The given task order made topological with as few moves as possible."""
        return list(self._topo)

    def topo_position(self, tid: str) -> int:
        return self._pos[tid]

    def tail(self, tid: str) -> float:
        """Longest path from the start of ``tid`` to the end of the graph, ``tid`` included."""
        return self._tail[tid]

    def head(self, tid: str) -> float:
        """Longest path of dependencies that must finish before ``tid`` can start."""
        return self._head[tid]

    def work(self, resource: str) -> float:
        return sum(t.duration for t in self.tasks if t.resource == resource)

    def critical_path(self) -> float:
        return max(self._tail.values(), default=0.0)

    def ancestor_bits(self) -> dict[str, int]:
        """Each task's transitive dependencies as a bit set over topological positions."""
        bits: dict[str, int] = {}
        for tid in self._topo:
            b = 0
            for d in self._by_id[tid].deps:
                b |= bits[d] | (1 << self._pos[d])
            bits[tid] = b
        return bits

    def descendant_bits(self) -> dict[str, int]:
        """Each task's transitive dependents as a bit set over topological positions."""
        bits: dict[str, int] = {}
        for tid in reversed(self._topo):
            b = 0
            for c in self._children[tid]:
                b |= bits[c] | (1 << self._pos[c])
            bits[tid] = b
        return bits

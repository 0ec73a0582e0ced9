"""The Plan: what the runtime executes for one captured graph, as plain, JSON-serialisable data.

A plan is an ordered list of tasks. Each task is a list of FX node names (run in that order) bound
to a stream. The runtime issues tasks in list order; on CUDA, tasks on different streams run
concurrently, ordered only by the data dependencies between them (events). Every rank must hold the
same plan: gloo and NCCL match collectives by issue order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

#: 2: every wait task names the collective task it completes (``Task.collective``).
PLAN_FORMAT_VERSION = 2

COMPUTE_STREAM = "compute"
COMM_STREAM = "comm"
STREAMS = (COMPUTE_STREAM, COMM_STREAM)


class _StrEnum(str, Enum):
    """An enum whose members are their strings: equal to them, hashed and printed like them, and
    written to JSON as them (plan files hold the plain strings)."""

    __str__ = str.__str__
    __format__ = str.__format__


class TaskKind(_StrEnum):
    """What a task does: compute (views included), a collective's issue, or the wait for one."""

    COMPUTE = "compute"
    COLLECTIVE_ISSUE = "collective_issue"
    COLLECTIVE_WAIT = "collective_wait"


class Phase(_StrEnum):
    """The phase of training a node or task belongs to."""

    FORWARD = "forward"
    INPUT_GRAD = "input_grad"
    WEIGHT_GRAD = "weight_grad"


def _version_error(what: str, version: object) -> str:
    return (
        f"{what} version {version!r} is not supported (this graphsched reads version "
        f"{PLAN_FORMAT_VERSION}, whose wait tasks name their collective); the file was written by "
        "another version of graphsched. Re-plan: delete the file (and drop plan_file= if it was "
        "passed), run a step so graphsched plans again, and write it anew with "
        "graphsched.save_plans(model, path)."
    )


@dataclass
class Task:
    """A run of graph nodes executed back to back on one stream."""

    name: str
    nodes: list[str]
    stream: str = COMPUTE_STREAM
    kind: TaskKind = TaskKind.COMPUTE
    phase: Phase = Phase.FORWARD
    #: Predicted start and end, seconds from the start of the graph (None when not predicted).
    start: float | None = None
    end: float | None = None
    #: A wait task: the name of the collective task (same plan) whose transfer it waits for.
    collective: str | None = None

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"task {self.name!r}: stream {self.stream!r} is not one of {STREAMS}")
        # Plain strings (JSON, hand-written plans) become the enum members they name.
        try:
            self.kind = TaskKind(self.kind)
            self.phase = Phase(self.phase)
        except ValueError as exc:
            raise ValueError(
                f"task {self.name!r}: {exc}; a task's kind is one of {[k.value for k in TaskKind]} "
                f"and its phase one of {[p.value for p in Phase]}"
            ) from None


@dataclass
class Plan:
    """The execution plan of one captured graph (forward, backward or inference)."""

    graph_name: str
    #: Hash of the graph's structure (ops, shapes, edges); a plan is only valid for that graph.
    graph_hash: str
    tasks: list[Task]
    #: How the plan was chosen (schedule name, chunk counts, solver status, ...).
    options: dict[str, Any] = field(default_factory=dict)
    #: The cost numbers the plan was chosen from (node name -> seconds), for reproducibility.
    costs: dict[str, float] = field(default_factory=dict)
    predicted_time: float | None = None
    version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.check_collectives()

    def check_collectives(self) -> None:
        """Refuse a plan whose waits and collectives are not paired one way: every wait task names
        exactly one collective task of this plan, and only wait tasks name one.

        Run on construction and again by the runtime before a plan runs (a plan's tasks are plain
        data that may have changed since); raises ValueError naming the fix.
        """
        issues: dict[str, int] = {}
        for t in self.tasks:
            if t.kind == TaskKind.COLLECTIVE_ISSUE:
                issues[t.name] = issues.get(t.name, 0) + 1
        for t in self.tasks:
            if t.collective is None:
                if t.kind == TaskKind.COLLECTIVE_WAIT:
                    raise ValueError(
                        f"wait task {t.name!r} of plan {self.graph_name!r} names no collective "
                        "(Task.collective is None), so nothing can tell which transfer it "
                        "completes; set collective= to the name of the collective task it waits "
                        "for, or build the plan with graphsched.schedule.plans (finish_tasks "
                        "pairs every wait with its collective)."
                    )
                continue
            if t.kind != TaskKind.COLLECTIVE_WAIT:
                raise ValueError(
                    f"task {t.name!r} ({t.kind}) names a collective ({t.collective!r}); only wait "
                    "tasks name the collective they complete."
                )
            if issues.get(t.collective) != 1:
                found = "no" if t.collective not in issues else "more than one"
                raise ValueError(
                    f"wait task {t.name!r} completes {t.collective!r}, but the plan has {found} "
                    "collective task of that name; name one collective task of the same plan."
                )

    def node_order(self) -> list[str]:
        return [n for t in self.tasks for n in t.nodes]

    def collective_pairs(self) -> dict[int, int]:
        """Wait task index -> index of the collective task it completes, for every wait."""
        index = {t.name: i for i, t in enumerate(self.tasks) if t.kind == TaskKind.COLLECTIVE_ISSUE}
        return {i: index[t.collective] for i, t in enumerate(self.tasks) if t.collective is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        version = data.get("version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(_version_error("plan format", version))
        fields = dict(data)
        fields["tasks"] = [Task(**t) for t in data["tasks"]]
        return cls(**fields)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def content_hash(self) -> str:
        """Hash of everything that decides execution: graph, task order, nodes and streams.

        Predicted times and cost numbers are left out on purpose: two ranks that measured slightly
        different costs but chose the same order run the same collectives in the same order.
        """
        decisive = {
            "version": self.version,
            "graph_hash": self.graph_hash,
            "tasks": [(t.stream, t.nodes) for t in self.tasks],
        }
        blob = json.dumps(decisive, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass
class ModelPlan:
    """The plans of every graph of a wrapped model, saved and loaded as one JSON file."""

    plans: dict[str, Plan] = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION

    def to_json(self, indent: int | None = 1) -> str:
        data = {"version": self.version, "plans": {k: p.to_dict() for k, p in self.plans.items()}}
        return json.dumps(data, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelPlan":
        data = json.loads(text)
        if not isinstance(data, dict) or not data:
            raise ValueError(
                f"this JSON ({'an empty object' if data == {} else type(data).__name__}) holds no plans; "
                "a plan file is what graphsched.save_plans(model, path) writes, or the plan.json "
                "graphsched demo writes"
            )
        if "version" not in data and "plans" not in data:
            if "graph_hash" in data and "tasks" in data:  # one Plan's JSON
                plan = Plan.from_dict(data)
                return cls(plans={plan.graph_name: plan})
            if all(isinstance(v, dict) and "graph_hash" in v and "tasks" in v for v in data.values()):
                # graphsched demo's plan.json: graph name -> Plan, as written by this version
                return cls(plans={k: Plan.from_dict(v) for k, v in data.items()})
            raise ValueError(
                "this JSON is not a graphsched plan file (no 'version' and 'plans', and its entries "
                "are not plans); pass the file graphsched.save_plans(model, path) wrote, or the "
                "plan.json of graphsched demo"
            )
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(_version_error("plan file", data.get("version")))
        return cls(plans={k: Plan.from_dict(v) for k, v in data["plans"].items()})

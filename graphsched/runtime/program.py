"""The aten engine: a plan's order lowered to instructions, then run as straight-line Python.

``lower`` turns a graph and a validated plan order into :class:`Instructions` (environment slots,
one instruction per node with the slots to drop after it, the streams it crosses, the task spans).
``build_program`` turns those into one Python function, like ``torch.fx``'s own code generation:
one statement per node, ``del`` after each value's last use, and on CUDA the stream switches,
event waits and ``record_stream`` calls inlined where the plan crosses streams. Interpreting nodes
one by one costs microseconds of Python per node, which on a GPU is the same order as a small
kernel; the generated function costs none of that.

Recording (``record=True``) is an option of the same code: statements that time each task are
emitted around its instructions, and nothing else changes, so a recorded step computes what an
unrecorded one does. On CPU (or on one stream) the host clock brackets each task and a
collective's interval runs from its issue to the end of its wait; on CUDA, timing events are
recorded on the task's stream around it (see ``runtime/recorder.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphsched.plan import COMPUTE_STREAM, Plan, TaskKind


@dataclass(frozen=True)
class Ref:
    """An argument that reads environment slot ``index``."""

    index: int


@dataclass
class Instr:
    index: int
    target: Any
    args: Any
    kwargs: Any
    stream: str
    #: env slots to drop after this instruction (their last use).
    release: tuple[int, ...]
    #: inputs produced on another stream: (slot, producing stream).
    cross_inputs: tuple[tuple[int, str], ...]
    #: True when some consumer on another stream needs an event after this node.
    needs_event: bool


@dataclass(frozen=True)
class TaskSpan:
    """One plan task: instructions ``start`` to ``end`` (exclusive), and what a recorder files it as."""

    start: int
    end: int
    name: str
    stream: str
    kind: str
    phase: str


@dataclass
class Instructions:
    """A plan's order, lowered: what ``build_program`` generates code from."""

    graph_name: str
    n_inputs: int
    n_slots: int
    #: lifted constants (get_attr nodes): (slot, value), read from the module once
    constants: list[tuple[int, Any]]
    instrs: list[Instr]
    #: the graph's output, with Refs for the values it returns
    output: Any
    tasks: list[TaskSpan]
    #: task index of a collective's wait -> task index of its issue
    issue_task_of_wait: dict[int, int]


def _to_refs(arg: Any, index: dict[fx.Node, int]) -> Any:
    return fx.node.map_aggregate(arg, lambda a: Ref(index[a]) if isinstance(a, fx.Node) else a)


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def lower(
    gm: fx.GraphModule,
    plan: Plan,
    ordered: list[fx.Node],
    use_comm_stream: bool = True,
    free_after_last_use: bool = True,
) -> Instructions:
    """``gm``'s nodes in ``ordered`` (``plan``'s order, validated) as instructions."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Lifted constants (get_attr) are read from the module once; they behave like inputs.
    constants = [n for n in graph.nodes if n.op == "get_attr"]
    output = next(n for n in graph.nodes if n.op == "output")

    stream_of: dict[str, str] = {}
    for task in plan.tasks:
        for name in task.nodes:
            stream_of[name] = task.stream if use_comm_stream else COMPUTE_STREAM

    index: dict[fx.Node, int] = {}
    for n in placeholders:
        index[n] = len(index)
    for n in constants:
        index[n] = len(index)
    constant_values = [(index[n], _fetch_attr(gm, str(n.target))) for n in constants]
    for n in ordered:
        index[n] = len(index)

    # Last use in plan order; graph outputs are never released.
    position = {n: i for i, n in enumerate(ordered)}
    last_use: dict[fx.Node, int] = {}
    for n in ordered:
        for inp in n.all_input_nodes:
            last_use[inp] = max(last_use.get(inp, -1), position[n])
    keep = set(output.all_input_nodes)
    releases: dict[int, list[int]] = {}
    if free_after_last_use:
        for node, pos in last_use.items():
            if node not in keep:
                releases.setdefault(pos, []).append(index[node])
        # Nodes nobody reads (e.g. an unused getitem) die right away.
        for n in ordered:
            if n not in last_use and n not in keep:
                releases.setdefault(position[n], []).append(index[n])

    # Task boundaries (instruction ranges); the plan names, for each wait, the task that issued
    # its collective (read only when recording).
    tasks: list[TaskSpan] = []
    first = 0
    for t in plan.tasks:
        stream = stream_of[t.nodes[0]] if t.nodes else COMPUTE_STREAM
        tasks.append(TaskSpan(first, first + len(t.nodes), t.name, stream, t.kind, t.phase))
        first += len(t.nodes)
    issue_task_of_wait = plan.collective_pairs()

    produced_on = {n: stream_of[n.name] for n in ordered}
    instrs: list[Instr] = []
    for n in ordered:
        stream = stream_of[n.name]
        cross = tuple(
            sorted(
                {(index[i], produced_on[i]) for i in n.all_input_nodes if i in produced_on and produced_on[i] != stream}
            )
        )
        needs_event = any(stream_of.get(u.name, COMPUTE_STREAM) != stream for u in n.users)
        instrs.append(
            Instr(
                index=index[n],
                target=n.target,
                args=_to_refs(n.args, index),
                kwargs=_to_refs(n.kwargs, index),
                stream=stream,
                release=tuple(sorted(releases.get(position[n], ()))),
                cross_inputs=cross,
                needs_event=needs_event or (n in keep and stream != COMPUTE_STREAM),
            )
        )
    return Instructions(
        graph_name=plan.graph_name,
        n_inputs=len(placeholders),
        n_slots=len(index),
        constants=constant_values,
        instrs=instrs,
        output=_to_refs(output.args[0], index),
        tasks=tasks,
        issue_task_of_wait=issue_task_of_wait,
    )


_LITERALS = (int, bool, str, type(None))


class _Emitter:
    def __init__(self) -> None:
        self.constants: list[Any] = []

    def const(self, value: Any) -> str:
        self.constants.append(value)
        return f"K[{len(self.constants) - 1}]"

    def expr(self, arg: Any) -> str:
        if isinstance(arg, Ref):
            return f"v{arg.index}"
        if isinstance(arg, tuple):
            inner = ", ".join(self.expr(a) for a in arg)
            return f"({inner},)" if arg else "()"
        if isinstance(arg, list):
            return "[" + ", ".join(self.expr(a) for a in arg) + "]"
        if isinstance(arg, dict):
            return "{" + ", ".join(f"{k!r}: {self.expr(v)}" for k, v in arg.items()) + "}"
        if isinstance(arg, _LITERALS):
            return repr(arg)
        if isinstance(arg, float) and arg == arg and arg not in (float("inf"), float("-inf")):
            return repr(arg)
        return self.const(arg)


def _record_stream(value: Any, stream: "torch.cuda.Stream") -> None:
    if isinstance(value, torch.Tensor):
        value.record_stream(stream)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _record_stream(v, stream)


def _event(stream: "torch.cuda.Stream") -> "torch.cuda.Event":
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _timing_event(stream: "torch.cuda.Stream") -> "torch.cuda.Event":
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


def _recorded(code: Instructions, issued: set[int], i: int, add: Callable[[int], str]) -> list[str]:
    """The statements that record task ``i`` once it has ended: ``add(t)`` records task ``t`` up to
    now. A collective's issue records nothing yet; its wait records itself and then the
    collective, from the issue's start to the wait's end (the plan names the pair)."""
    if code.tasks[i].kind == TaskKind.COLLECTIVE_ISSUE:
        issued.add(i)
        return []
    lines = [add(i)]
    src = code.issue_task_of_wait.get(i)
    if src is not None and src in issued:
        issued.discard(src)
        lines.append(add(src))
    return lines


class _HostClockRecording:
    """Statements that time every task with the recorder's host clock (no streams)."""

    def __init__(self, code: Instructions) -> None:
        self.code = code
        self.issued: set[int] = set()

    def before_task(self, i: int) -> list[str]:
        return ["    _t0 = R.now()"]

    def after_task(self, i: int) -> list[str]:
        lines = ["    _t1 = R.now()"]
        if self.code.tasks[i].kind == TaskKind.COLLECTIVE_ISSUE:
            lines.append(f"    _i{i} = _t0")
        return lines + _recorded(
            self.code, self.issued, i, lambda t: f"    R.add(G, *TK[{t}], {'_t0' if t == i else f'_i{t}'}, _t1)"
        )


class _EventRecording:
    """Statements that record timing events on each task's stream (CUDA, several streams)."""

    def __init__(self, code: Instructions) -> None:
        self.code = code
        # A task's first and last instruction; tasks without nodes are not recorded.
        self.task_at = {t.start: i for i, t in enumerate(code.tasks)}
        self.ends_at = {t.end - 1: i for i, t in enumerate(code.tasks) if t.end > t.start}
        self.issued: set[int] = set()

    def before(self, pos: int, stream: str) -> list[str]:
        i = self.task_at.get(pos)
        return [] if i is None else [f"    _s{i} = TEV(S[{stream!r}])"]

    def after(self, pos: int, stream: str) -> list[str]:
        i = self.ends_at.get(pos)
        if i is None:
            return []
        return [f"    _e{i} = TEV(S[{stream!r}])"] + _recorded(
            self.code, self.issued, i, lambda t: f"    R.add_events(G, *TK[{t}], _s{t}, _e{i})"
        )


def build_program(code: Instructions, with_streams: bool, record: bool = False) -> Callable[..., Any]:
    """``program(inputs, S, R)``: run every instruction; S maps stream name -> stream (None
    without streams), R is the StepRecorder when ``record`` (else unused)."""
    em = _Emitter()
    targets: list[Any] = []
    lines = ["def program(inputs, S, R):"]
    if code.n_inputs:
        names = ", ".join(f"v{i}" for i in range(code.n_inputs))
        lines.append(f"    {names}, = inputs")
        lines.append("    inputs.clear()")
    for slot, _value in code.constants:
        lines.append(f"    v{slot} = C[{slot}]")
    host_clock = _HostClockRecording(code) if record and not with_streams else None
    events = _EventRecording(code) if record and with_streams else None
    spans = [(i, t.start, t.end) for i, t in enumerate(code.tasks)] if host_clock is not None else []
    instrs = code.instrs
    current = COMPUTE_STREAM
    event_slots: set[int] = set()

    def emit(pos: int) -> None:
        nonlocal current
        ins = instrs[pos]
        targets.append(ins.target)
        call = f"T[{len(targets) - 1}]({', '.join([em.expr(a) for a in ins.args] + [f'{k}={em.expr(v)}' for k, v in ins.kwargs.items()])})"
        if with_streams:
            if ins.stream != current:
                lines.append(f"    torch.cuda.set_stream(S[{ins.stream!r}])")
                current = ins.stream
            for slot, _producer in ins.cross_inputs:
                if slot in event_slots:
                    lines.append(f"    S[{ins.stream!r}].wait_event(e{slot})")
                lines.append(f"    RS(v{slot}, S[{ins.stream!r}])")
        if events is not None:
            lines.extend(events.before(pos, ins.stream))
        lines.append(f"    v{ins.index} = {call}")
        if with_streams and ins.needs_event:
            lines.append(f"    e{ins.index} = EV(S[{ins.stream!r}])")
            event_slots.add(ins.index)
        if events is not None:
            lines.extend(events.after(pos, ins.stream))
        if ins.release:
            lines.append("    del " + ", ".join(f"v{s}" for s in ins.release))
            for s in ins.release:
                if s in event_slots:
                    lines.append(f"    e{s} = None")

    if host_clock is not None:
        for i, start, end in spans:
            lines.extend(host_clock.before_task(i))
            for pos in range(start, end):
                emit(pos)
            lines.extend(host_clock.after_task(i))
    else:
        for pos in range(len(instrs)):
            emit(pos)
    if with_streams:
        if current != COMPUTE_STREAM:
            lines.append(f"    torch.cuda.set_stream(S[{COMPUTE_STREAM!r}])")
        # Results reach the caller on its (compute) stream.
        lines.append("    for _name, _s in S.items():")
        lines.append(f"        if _name != {COMPUTE_STREAM!r}:")
        lines.append(f"            S[{COMPUTE_STREAM!r}].wait_event(EV(_s))")
    lines.append(f"    return {em.expr(code.output)}")
    source = "\n".join(lines)
    namespace: dict[str, Any] = {
        "T": targets,
        "K": em.constants,
        "C": dict(code.constants),
        "RS": _record_stream,
        "EV": _event,
        "TEV": _timing_event,
        "G": code.graph_name,
        "TK": [(t.name, t.stream, t.kind, t.phase) for t in code.tasks],
        "torch": torch,
    }
    exec(compile(source, f"<graphsched plan {code.graph_name}>", "exec"), namespace)
    program = namespace["program"]
    program.source = source  # type: ignore[attr-defined]
    return program

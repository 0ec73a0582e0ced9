"""Execute a captured aten graph in the order a Plan gives, on the streams it names.

The executor is what graphsched hands back to AOTAutograd as the "compiled" forward or backward.
It interprets the FX nodes itself (no code generation), which is what lets any topologically valid
order run: the plan decides the order, the graph decides the arithmetic, so numerics are those of
the captured graph whatever the order. Intermediate tensors are dropped right after their last use
in the plan's order, and the boxed argument list is cleared on entry, as AOTAutograd's own
runtime does, so saved activations are freed during backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphsched.analysis.graph import is_random
from graphsched.errors import PlanError
from graphsched.plan import COMPUTE_STREAM, Plan
from graphsched.runtime.program import build_program
from graphsched.runtime.streams import StreamSet


@dataclass(frozen=True)
class _Ref:
    index: int


def _to_refs(arg: Any, index: dict[fx.Node, int]) -> Any:
    return fx.node.map_aggregate(arg, lambda a: _Ref(index[a]) if isinstance(a, fx.Node) else a)


def _resolve(arg: Any, env: list[Any]) -> Any:
    if isinstance(arg, _Ref):
        return env[arg.index]
    if isinstance(arg, (list, tuple)):
        resolved = [_resolve(a, env) for a in arg]
        return tuple(resolved) if isinstance(arg, tuple) else resolved
    if isinstance(arg, dict):
        return {k: _resolve(v, env) for k, v in arg.items()}
    return arg


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


@dataclass
class _Instr:
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


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def validate_plan(graph: fx.Graph, plan: Plan) -> list[fx.Node]:
    """Check that ``plan`` covers every compute node of ``graph`` once, in a topological order.

    Returns the nodes in plan order. Raises PlanError naming the first problem.
    """
    by_name = {n.name: n for n in graph.nodes}
    order = plan.node_order()
    seen: set[str] = set()
    nodes: list[fx.Node] = []
    for name in order:
        node = by_name.get(name)
        if node is None:
            raise PlanError(
                f"plan {plan.graph_name!r} names node {name!r}, which the graph does not have; the "
                "plan was made for another graph: re-plan, or drop the plan file."
            )
        if node.op != "call_function":
            raise PlanError(f"plan {plan.graph_name!r} schedules {node.op} node {name!r}; only call_function nodes are scheduled.")
        if name in seen:
            raise PlanError(f"plan {plan.graph_name!r} runs node {name!r} twice.")
        for inp in node.all_input_nodes:
            if inp.op == "call_function" and inp.name not in seen:
                raise PlanError(
                    f"plan {plan.graph_name!r} runs {name!r} before its input {inp.name!r}: the order "
                    "is not topological."
                )
        seen.add(name)
        nodes.append(node)
    position = {name: i for i, name in enumerate(order)}
    randoms = [n.name for n in graph.nodes if is_random(n) and n.name in position]
    if any(position[a] > position[b] for a, b in zip(randoms, randoms[1:])):
        raise PlanError(
            f"plan {plan.graph_name!r} reorders random ops ({randoms[:4]}...): they would draw "
            "other numbers than the unscheduled model. Keep random ops in captured order."
        )
    missing = [n.name for n in graph.nodes if n.op == "call_function" and n.name not in seen]
    if missing:
        raise PlanError(
            f"plan {plan.graph_name!r} leaves out {len(missing)} node(s), e.g. {missing[:3]}; a plan "
            "must schedule every node of its graph."
        )
    return nodes


class GraphExecutor:
    """Callable with AOTAutograd's boxed calling convention: ``executor(list_of_args)``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        plan: Plan,
        device: torch.device | None = None,
        use_comm_stream: bool = True,
        free_after_last_use: bool = True,
        verify_plan: Callable[[Plan], None] | None = None,
    ) -> None:
        # An instance attribute: AOTAutograd wraps compiled functions with functools.wraps, which
        # copies the instance __dict__ but not class attributes.
        self._boxed_call = True
        self.gm = gm
        self.plan = plan
        graph = gm.graph
        ordered = validate_plan(graph, plan)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        # Lifted constants (get_attr) are read from the module once; they behave like inputs.
        constants = [n for n in graph.nodes if n.op == "get_attr"]
        output = next(n for n in graph.nodes if n.op == "output")

        stream_of: dict[str, str] = {}
        for task in plan.tasks:
            for name in task.nodes:
                stream_of[name] = task.stream if use_comm_stream else COMPUTE_STREAM
        self._uses_streams = len(set(stream_of.values())) > 1

        index: dict[fx.Node, int] = {}
        for n in placeholders:
            index[n] = len(index)
        for n in constants:
            index[n] = len(index)
        self._constants = [(index[n], _fetch_attr(gm, str(n.target))) for n in constants]
        for n in ordered:
            index[n] = len(index)
        self._n_slots = len(index)
        self._n_inputs = len(placeholders)

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

        # Task boundaries (instruction ranges) and, for each wait, the task that issued its
        # collective: used only when a recorder is attached.
        self._tasks: list[tuple[int, int, str, str, str, str]] = []
        first = 0
        task_of_node: dict[str, int] = {}
        for t in plan.tasks:
            for name in t.nodes:
                task_of_node[name] = len(self._tasks)
            stream = stream_of[t.nodes[0]] if t.nodes else COMPUTE_STREAM
            self._tasks.append((first, first + len(t.nodes), t.name, stream, t.kind, t.phase))
            first += len(t.nodes)
        by_name = {n.name: n for n in ordered}
        self._issue_task_of_wait: dict[int, int] = {}
        for i, t in enumerate(plan.tasks):
            if t.kind == "collective_wait":
                for name in t.nodes:
                    for inp in by_name[name].all_input_nodes:
                        if inp.name in task_of_node:
                            self._issue_task_of_wait[i] = task_of_node[inp.name]
        #: Set to a StepRecorder to record task timings (None: no recording, no cost).
        self.recorder: Any = None

        produced_on = {n: stream_of[n.name] for n in ordered}
        self._instrs: list[_Instr] = []
        for n in ordered:
            stream = stream_of[n.name]
            cross = tuple(
                sorted(
                    {(index[i], produced_on[i]) for i in n.all_input_nodes if i in produced_on and produced_on[i] != stream}
                )
            )
            needs_event = any(stream_of.get(u.name, COMPUTE_STREAM) != stream for u in n.users)
            self._instrs.append(
                _Instr(
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
        self._output = _to_refs(output.args[0], index)
        self._device = device
        self._streams: StreamSet | None = None
        # Checked once, on the first call, when every rank runs this graph for the first time.
        self._verify_plan = verify_plan
        self._program: Callable[..., Any] | None = None
        self._stream_program: Callable[..., Any] | None = None

    def _stream_set(self) -> StreamSet | None:
        if not self._uses_streams or self._device is None or self._device.type != "cuda":
            return None
        if self._streams is None:
            self._streams = StreamSet.for_device(self._device)
        self._streams.refresh_compute()
        return self._streams

    def __call__(self, args: list[Any]) -> Any:
        if len(args) != self._n_inputs:
            raise PlanError(f"graph {self.plan.graph_name!r} expects {self._n_inputs} inputs, got {len(args)}")
        if self._verify_plan is not None:
            verify, self._verify_plan = self._verify_plan, None
            verify(self.plan)
        streams = self._stream_set()
        if self.recorder is None:
            # Fast path: the plan as straight-line code (built on first use).
            if streams is None:
                if self._program is None:
                    self._program = build_program(self, with_streams=False)
                return self._program(args, None, None)
            if self._stream_program is None:
                self._stream_program = build_program(self, with_streams=True)
            return self._stream_program(args, None, streams.streams)
        env: list[Any] = [None] * self._n_slots
        env[: self._n_inputs] = args
        for slot, value in self._constants:
            env[slot] = value
        # Boxed convention: drop the caller's references so that inputs die at their last use.
        args.clear()
        if self.recorder is not None:
            self._run_recorded(env, streams)
        elif streams is None:
            for ins in self._instrs:
                env[ins.index] = ins.target(*_resolve(ins.args, env), **_resolve(ins.kwargs, env))
                for slot in ins.release:
                    env[slot] = None
        else:
            self._run_on_streams(env, streams)
        return _resolve(self._output, env)

    def _run_recorded(self, env: list[Any], streams: StreamSet | None) -> None:
        """Run task by task, recording each task's interval (see runtime/recorder.py)."""
        rec = self.recorder
        name = self.plan.graph_name
        if streams is None:
            issued: dict[int, float] = {}
            for i, (lo, hi, task, stream, kind, phase) in enumerate(self._tasks):
                t0 = rec.now()
                for ins in self._instrs[lo:hi]:
                    env[ins.index] = ins.target(*_resolve(ins.args, env), **_resolve(ins.kwargs, env))
                    for slot in ins.release:
                        env[slot] = None
                t1 = rec.now()
                if kind == "collective_issue":
                    issued[i] = t0
                    continue
                rec.add(name, task, stream, kind, phase, t0, t1)
                src = self._issue_task_of_wait.get(i)
                if src is not None and src in issued:
                    _, _, ctask, cstream, ckind, cphase = self._tasks[src]
                    rec.add(name, ctask, cstream, ckind, cphase, issued.pop(src), t1)
            return
        # CUDA: the same stream logic as _run_on_streams, with events around every task.
        starts: dict[int, Any] = {}
        task_at = {lo: i for i, (lo, *_rest) in enumerate(self._tasks)}
        ends_at = {hi - 1: i for i, (_lo, hi, *_rest) in enumerate(self._tasks) if hi > _lo}
        issue_start: dict[int, Any] = {}

        def before(pos: int, stream: "torch.cuda.Stream") -> None:
            i = task_at.get(pos)
            if i is not None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(stream)
                starts[i] = ev

        def after(pos: int, stream: "torch.cuda.Stream") -> None:
            i = ends_at.get(pos)
            if i is None:
                return
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream)
            _, _, task, sname, kind, phase = self._tasks[i]
            if kind == "collective_issue":
                issue_start[i] = starts[i]
                return
            rec.add_events(name, task, sname, kind, phase, starts[i], ev)
            src = self._issue_task_of_wait.get(i)
            if src is not None and src in issue_start:
                _, _, ctask, cstream, ckind, cphase = self._tasks[src]
                rec.add_events(name, ctask, cstream, ckind, cphase, issue_start.pop(src), ev)

        self._run_on_streams(env, streams, before, after)

    def _run_on_streams(
        self,
        env: list[Any],
        streams: StreamSet,
        before: Callable[[int, Any], None] | None = None,
        after: Callable[[int, Any], None] | None = None,
    ) -> None:
        events: dict[int, torch.cuda.Event] = {}
        last_event: dict[str, torch.cuda.Event] = {}
        for pos, ins in enumerate(self._instrs):
            stream = streams.streams[ins.stream]
            for slot, producer in ins.cross_inputs:
                ev = events.get(slot)
                if ev is not None:
                    stream.wait_event(ev)
                # The caching allocator must not hand this memory out again on the producing
                # stream while this stream may still read it.
                for t in _tensors_in(env[slot]):
                    t.record_stream(stream)
            if before is not None:
                before(pos, stream)
            with torch.cuda.stream(stream):
                env[ins.index] = ins.target(*_resolve(ins.args, env), **_resolve(ins.kwargs, env))
                if ins.needs_event:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events[ins.index] = ev
                    last_event[ins.stream] = ev
            if after is not None:
                after(pos, stream)
            for slot in ins.release:
                env[slot] = None
                events.pop(slot, None)
        # Results reach the caller on its (compute) stream.
        compute = streams.streams[COMPUTE_STREAM]
        for name, stream in streams.streams.items():
            if name != COMPUTE_STREAM:
                ev = torch.cuda.Event()
                ev.record(stream)
                compute.wait_event(ev)

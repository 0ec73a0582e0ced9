"""Execute a captured aten graph in the order a Plan gives, on the streams it names.

The executor is what graphsched hands back to AOTAutograd as the "compiled" forward or backward.
It runs the FX nodes itself, through the one engine of ``runtime/program.py`` (the plan lowered to
instructions, then generated as straight-line Python, with or without recording), which is what
lets any topologically valid order run: the plan decides the order, the graph decides the
arithmetic, so numerics are those of the captured graph whatever the order. Intermediate tensors are dropped right after their last use
in the plan's order, and the boxed argument list is cleared on entry, as AOTAutograd's own
runtime does, so saved activations are freed during backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from graphsched.analysis.graph import is_random
from graphsched.errors import PlanError
from graphsched.plan import Plan
from graphsched.runtime.program import build_program, lower
from graphsched.runtime.streams import StreamSet


def validate_plan(graph: fx.Graph, plan: Plan) -> list[fx.Node]:
    """Check that ``plan`` covers every compute node of ``graph`` once, in a topological order,
    and that each of its wait tasks names the collective it completes.

    Returns the nodes in plan order. Raises PlanError naming the first problem.
    """
    try:
        plan.check_collectives()  # again here: a plan's tasks may have changed since construction
    except ValueError as exc:
        raise PlanError(str(exc)) from None
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
        ordered = validate_plan(gm.graph, plan)
        #: The plan lowered to instructions, what every program of this executor is generated from.
        self.instructions = lower(gm, plan, ordered, use_comm_stream, free_after_last_use)
        self._uses_streams = len({ins.stream for ins in self.instructions.instrs}) > 1
        #: Set to a StepRecorder to record task timings (None: no recording, no cost).
        self.recorder: Any = None
        self._device = device
        self._streams: StreamSet | None = None
        # Checked once, on the first call, when every rank runs this graph for the first time.
        self._verify_plan = verify_plan
        #: (with streams, recording) -> generated program, built on first use.
        self._programs: dict[tuple[bool, bool], Callable[..., Any]] = {}

    def _stream_set(self) -> StreamSet | None:
        if not self._uses_streams or self._device is None or self._device.type != "cuda":
            return None
        if self._streams is None:
            self._streams = StreamSet.for_device(self._device)
        self._streams.refresh_compute()
        return self._streams

    def program(self, with_streams: bool, record: bool) -> Callable[..., Any]:
        """The generated program for these options (see ``runtime/program.py``)."""
        key = (with_streams, record)
        if key not in self._programs:
            self._programs[key] = build_program(self.instructions, with_streams, record)
        return self._programs[key]

    def __call__(self, args: list[Any]) -> Any:
        n_inputs = self.instructions.n_inputs
        if len(args) != n_inputs:
            raise PlanError(f"graph {self.plan.graph_name!r} expects {n_inputs} inputs, got {len(args)}")
        if self._verify_plan is not None:
            verify, self._verify_plan = self._verify_plan, None
            verify(self.plan)
        streams = self._stream_set()
        recorder = self.recorder
        program = self.program(streams is not None, recorder is not None)
        return program(args, None if streams is None else streams.streams, recorder)

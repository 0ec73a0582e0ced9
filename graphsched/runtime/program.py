"""Straight-line Python for an executor's instruction list (the fast path of GraphExecutor).

Interpreting nodes one by one costs microseconds of Python per node, which on a GPU is the same
order as a small kernel. Like ``torch.fx``'s own code generation, the plan's order is turned into
one Python function: one statement per node, ``del`` after each value's last use, and on CUDA the
stream switches, event waits and ``record_stream`` calls inlined where the plan crosses streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from graphsched.plan import COMPUTE_STREAM

if TYPE_CHECKING:
    from graphsched.runtime.executor import GraphExecutor


_LITERALS = (int, bool, str, type(None))


class _Emitter:
    def __init__(self) -> None:
        self.constants: list[Any] = []

    def const(self, value: Any) -> str:
        self.constants.append(value)
        return f"K[{len(self.constants) - 1}]"

    def expr(self, arg: Any) -> str:
        from graphsched.runtime.executor import _Ref

        if isinstance(arg, _Ref):
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


def build_program(ex: "GraphExecutor", with_streams: bool) -> Callable[..., Any]:
    """``program(inputs, constants, S)``: run every instruction; S maps stream name -> stream."""
    em = _Emitter()
    targets: list[Any] = []
    lines = ["def program(inputs, consts, S):"]
    if ex._n_inputs:
        names = ", ".join(f"v{i}" for i in range(ex._n_inputs))
        lines.append(f"    {names}, = inputs")
        lines.append("    inputs.clear()")
    for slot, _value in ex._constants:
        lines.append(f"    v{slot} = C[{slot}]")
    current = COMPUTE_STREAM
    event_slots: set[int] = set()
    for ins in ex._instrs:
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
        lines.append(f"    v{ins.index} = {call}")
        if with_streams and ins.needs_event:
            lines.append(f"    e{ins.index} = EV(S[{ins.stream!r}])")
            event_slots.add(ins.index)
        if ins.release:
            lines.append("    del " + ", ".join(f"v{s}" for s in ins.release))
            for s in ins.release:
                if s in event_slots:
                    lines.append(f"    e{s} = None")
    if with_streams:
        if current != COMPUTE_STREAM:
            lines.append(f"    torch.cuda.set_stream(S[{COMPUTE_STREAM!r}])")
        # Results reach the caller on its (compute) stream.
        lines.append("    for _name, _s in S.items():")
        lines.append(f"        if _name != {COMPUTE_STREAM!r}:")
        lines.append(f"            S[{COMPUTE_STREAM!r}].wait_event(EV(_s))")
    lines.append(f"    return {em.expr(ex._output)}")
    source = "\n".join(lines)
    namespace: dict[str, Any] = {
        "T": targets,
        "K": em.constants,
        "C": dict(ex._constants),
        "RS": _record_stream,
        "EV": _event,
        "torch": torch,
    }
    exec(compile(source, f"<graphsched plan {ex.plan.graph_name}>", "exec"), namespace)
    program = namespace["program"]
    program.source = source  # type: ignore[attr-defined]
    return program

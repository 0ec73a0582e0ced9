"""The launches of an inductor-compiled graph, in code order, with the plan nodes each computes.

A profiled call says which kernels ran and for how long; to cost the plan's tasks each of them
must be tied to the FX nodes it computes. The wrapper inductor generates (``CompiledFxGraph
.source_code``) launches work in its ``call`` function line by line: a kernel (``triton_...
.run(...)``, ``cpp_fused_...(...)``), an extern op (``extern_kernels.mm(..., out=buf3)``), a
fallback op (``buf7 = torch.ops.aten.cumsum.default(...)``), a collective or its wait.
:func:`launch_sites` reads those lines into :class:`LaunchSite` records. A launch's nodes come
from

* the comment inductor writes before it (``# Topologically Sorted Source Nodes: [mm_3, ...]``,
  on every triton kernel and extern call; C++ kernels on CPU have none), and
* the buffers it is the first launch to mention (every buffer is first passed to the launch
  that writes it), mapped to their scheduler node through the order pass's report
  (``kernel_buffers``) and from there to that node's FX origins (``kernel_origins``).

* failing both (a kernel that only writes into buffers made before it, e.g. an in-place
  ``index_add`` into a zeroed buffer), the first scheduler node no launch claimed that lies, in
  the emitted order (``kernel_order``), between the nodes of the launches around it.

All are filtered to the plan's nodes (inductor's post-grad passes make nodes the plan does not
have). The parse is best effort and checked by its result: launches left without nodes are
counted (``unmapped_launches`` in the profile details) and their time stays unattributed.
"""

from __future__ import annotations

import re
from typing import Any, Collection, Mapping

from graphsched.analysis.step_costs import ROLE_COLLECTIVE, ROLE_COMPUTE, ROLE_WAIT, LaunchSite

_CALL_DEF = re.compile(r"^(\s*)def call\((self, )?args\):")
_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.\w+\(")
_ORIGINS = re.compile(r"#.*Source Nodes: \[([^\]]*)\]")
_BUFFER = re.compile(r"\bbuf\d+\b")
_ASSIGN = re.compile(r"^\s*(buf\d+) = (.*)$")
_EXTERN = re.compile(r"\bextern_kernels\.(\w+)\(")
_TORCH_OP = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.\w+\(")
_ATEN_OP = re.compile(r"(?<![\w.])aten\.(\w+)(?:\.\w+)?\(")
_KERNEL_CALL = re.compile(r"^\s*(\w+)(?:\.run)?\(")
_METHOD_OP = re.compile(r"^\s*buf\d+\.(zero_|copy_|fill_)\(")


def compiled_source(compiled: Any) -> str | None:
    """The wrapper source of an inductor-compiled graph (``CompiledFxGraph.source_code``), looking
    through graphsched's own wrapper; None where there is none."""
    for obj in (compiled, getattr(compiled, "compiled", None)):
        code = getattr(obj, "source_code", None)
        if isinstance(code, str):
            return code
    return None


def _call_body(lines: list[str]) -> list[str]:
    for i, line in enumerate(lines):
        m = _CALL_DEF.match(line)
        if m is None:
            continue
        indent = len(m.group(1))
        body = []
        for rest in lines[i + 1:]:
            if rest.strip() and len(rest) - len(rest.lstrip()) <= indent:
                break
            body.append(rest)
        return body
    return []


def _collective_role(namespace: str, op: str) -> str | None:
    if "c10d" not in namespace:
        return None
    return ROLE_WAIT if "wait" in op else ROLE_COLLECTIVE


def _launch(line: str, kernels: Collection[str]) -> tuple[str, str] | None:
    """(name, role) of the launch a line makes, or None."""
    code = line.split("#", 1)[0]
    m = _TORCH_OP.search(code)
    if m is not None:
        return m.group(2), _collective_role(m.group(1), m.group(2)) or ROLE_COMPUTE
    m = _EXTERN.search(code)
    if m is not None:
        return m.group(1), ROLE_COMPUTE
    m = _ATEN_OP.search(code)
    if m is not None and not code.lstrip().startswith(("del ", "assert")):
        return m.group(1), ROLE_COMPUTE
    m = _METHOD_OP.match(code)
    if m is not None:
        return m.group(1), ROLE_COMPUTE
    m = _KERNEL_CALL.match(code)
    if m is not None and m.group(1) in kernels:
        return m.group(1), ROLE_COMPUTE
    return None


def launch_sites(
    source: str,
    plan_nodes: Collection[str],
    kernel_buffers: Mapping[str, list[str]] | None = None,
    kernel_origins: Mapping[str, list[str]] | None = None,
    kernel_order: list[str] | None = None,
) -> list[LaunchSite]:
    """Every launch of the wrapper's ``call`` in order, with the plan nodes it computes
    (``kernel_buffers``, ``kernel_origins``, ``kernel_order``: the order pass's report)."""
    lines = source.splitlines()
    kernels = {m.group(1) for line in lines if (m := _KERNEL_DEF.match(line))}
    snode_of_buffer = {b: sn for sn, bufs in (kernel_buffers or {}).items() for b in bufs}
    plan_nodes = set(plan_nodes)
    origins = kernel_origins or {}
    launches: list[tuple[str, str, set[str], set[str]]] = []  # name, role, nodes, scheduler nodes
    defined: set[str] = set()
    # A buffer that takes over another's storage (``buf12 = buf11; del buf11  # reuse``) before
    # either is written stands for both: the launch that writes it makes both.
    stands_for: dict[str, set[str]] = {}
    pending: list[str] = []
    for line in _call_body(lines):
        stripped = line.strip()
        m = _ORIGINS.search(stripped)
        if m is not None and stripped.startswith("#"):
            pending = [n.strip() for n in m.group(1).split(",") if n.strip()]
            continue
        launch = _launch(line, kernels)
        assign = _ASSIGN.match(line)
        if launch is None:
            if assign is not None:
                target, value = assign.groups()
                source_buf = _BUFFER.match(value.strip())
                if source_buf is not None and "reuse" in line and source_buf.group(0) not in defined:
                    stands_for[target] = {target} | stands_for.get(source_buf.group(0), {source_buf.group(0)})
                elif source_buf is not None and source_buf.group(0) in defined and "[" in value:
                    defined.add(target)  # an item of a tuple a launch made
            continue
        name, role = launch
        mentioned = set(_BUFFER.findall(line.split("#", 1)[0]))
        made: set[str] = set()
        for b in mentioned:
            if b not in defined:
                made |= stands_for.get(b, {b})
        defined |= made
        snodes = {snode_of_buffer[b] for b in made if b in snode_of_buffer}
        nodes = set(pending).union(*(origins.get(sn, ()) for sn in snodes))
        launches.append((name, role, nodes & plan_nodes, snodes))
        pending = []
    _claim_by_order(launches, kernel_order or [], origins, plan_nodes)
    return [LaunchSite(name, tuple(sorted(nodes)), role) for name, role, nodes, _sn in launches]


def _claim_by_order(
    launches: list[tuple[str, str, set[str], set[str]]], order: list[str],
    origins: Mapping[str, list[str]], plan_nodes: set[str],
) -> None:
    """Give each compute launch left without nodes the first unclaimed scheduler node between
    its mapped neighbours in the emitted order (in place)."""
    position = {sn: i for i, sn in enumerate(order)}
    claimed = {sn for *_rest, sns in launches for sn in sns}
    where = [max((position[sn] for sn in sns if sn in position), default=None) for *_r, sns in launches]
    for i, (name, role, nodes, sns) in enumerate(launches):
        if nodes or role != ROLE_COMPUTE:
            continue
        lo = max((w for w in where[:i] if w is not None), default=-1)
        hi = min((w for w in where[i + 1:] if w is not None), default=len(order))
        for sn in order[lo + 1:hi]:
            own = set(origins.get(sn, ())) & plan_nodes
            if sn not in claimed and own:
                claimed.add(sn)
                nodes |= own
                sns.add(sn)
                where[i] = position[sn]
                break

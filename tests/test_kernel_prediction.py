"""The prediction of a compiled graph's kernels in their emitted order (``predict_kernels``)."""

from graphsched.codegen.order import predict_kernels


def _report(order: list[str], deps: dict[str, list[str]]) -> dict:
    return {
        "kernel_order": order,
        "kernel_origins": {k: [k] for k in order},
        "kernel_deps": deps,
        "comm_kernels": ["a2a"],
    }


def test_a_collective_runs_beside_compute_emitted_after_it():
    report = _report(["a2a", "mm"], {"a2a": [], "mm": []})
    costs = {"a2a": 3.0, "mm": 2.0}
    assert predict_kernels(report, costs, {"a2a"}) == 3.0


def test_a_collective_waits_for_compute_emitted_before_it_even_without_a_dependency():
    # The compiled wrapper calls the collective on the compute stream: the matmul launched
    # before it delays the transfer although the transfer does not read it.
    report = _report(["mm", "a2a"], {"a2a": [], "mm": []})
    costs = {"a2a": 3.0, "mm": 2.0}
    assert predict_kernels(report, costs, {"a2a"}) == 5.0


def test_compute_after_a_wait_starts_when_the_transfer_ends():
    report = _report(["a2a", "mm", "expert"], {"a2a": [], "mm": [], "expert": ["a2a"]})
    costs = {"a2a": 3.0, "mm": 1.0, "expert": 2.0}
    assert predict_kernels(report, costs, {"a2a"}) == 5.0

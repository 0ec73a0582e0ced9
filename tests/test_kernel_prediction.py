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


def test_a_transfer_keeps_its_whole_cost_when_its_issue_node_also_names_the_input_copy():
    # Inductor lists the all-to-all node among the origins of the kernel that copies its input as
    # well as of the collective kernel; only the collective kernel carries the transfer.
    report = {
        "kernel_order": ["copy", "a2a", "expert"],
        "kernel_origins": {"copy": ["slice", "all_to_all"], "a2a": ["all_to_all"], "expert": ["mm"]},
        "kernel_deps": {"copy": [], "a2a": ["copy"], "expert": ["a2a"]},
        "comm_kernels": ["a2a"],
    }
    costs = {"slice": 0.5, "all_to_all": 3.0, "mm": 2.0}
    assert predict_kernels(report, costs, {"all_to_all"}) == 5.5

"""graphsched's benchmark harness: ``python -m benchmarks.run --preset NAME``.

Every variant (eager, inductor, inductor with its overlap passes, DeepSpeed MoE, graphsched's
schedules, and the compute-only / communication-only limits) runs in one process on one device,
which plays one rank of an emulated expert-parallel group (graphsched.testing.emulated). Results
are written to ``benchmarks/results/*.json``; docs/benchmarks.md describes the method.
"""

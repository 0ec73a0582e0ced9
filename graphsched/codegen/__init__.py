"""Code generation: graphsched's plans compiled to fused kernels (inductor), emitted in plan order."""

from graphsched.codegen.inductor import (
    CODEGENS,
    InductorPlanOrder,
    compile_graph,
    inductor_available,
    inductor_oracle_backend,
    inductor_settings,
    resolve_codegen,
)

__all__ = [
    "CODEGENS",
    "InductorPlanOrder",
    "compile_graph",
    "inductor_available",
    "inductor_oracle_backend",
    "inductor_settings",
    "resolve_codegen",
]

"""The private torch APIs graphsched uses, in one place.

Every use of a private torch module (``torch._inductor``, ``torch._functorch``, ``torch._dynamo``,
``torch._subclasses``, ``torch._C``, ``torch.distributed._functional_collectives``, private
``distributed_c10d`` names) goes through this module, so a torch upgrade that moves one of them
is fixed here. The names are thin re-exports: nothing is adapted.

Names in the lazy table are imported on first access (module ``__getattr__``): importing
``graphsched.compat`` imports none of them, and a ``from graphsched.compat import X`` inside a
function imports ``X``'s torch module when that function runs, as the direct import did. The
function wrappers import nothing until they are called.

Checked on: torch 2.11 on GPU (the H200 runs recorded under ``benchmarks/results``) and torch
2.13 on CPU (``tests/test_layering.py`` resolves every name below).

=========================== ====================================================== ===== =====
name                        torch object                                            2.11  2.13
                                                                                    GPU   CPU
=========================== ====================================================== ===== =====
``aot_autograd``            ``torch._dynamo.backends.common.aot_autograd``          yes   yes
``unset_fake_temporarily``  ``torch._subclasses.fake_tensor.unset_fake_temporarily`` yes  yes
``funcol``                  ``torch.distributed._functional_collectives`` (module)  yes   yes
``TorchDispatchMode``       ``torch.utils._python_dispatch.TorchDispatchMode``      yes   yes
``create_work_from_future`` ``torch._C._distributed_c10d._create_work_from_future`` yes   yes
``resolve_process_group``   ``torch.distributed.distributed_c10d._resolve_process_group`` yes yes
``inductor_config``         ``torch._inductor.config`` (module)                     yes   yes
``select_decomp_table``     ``torch._inductor.decomposition.select_decomp_table``   yes   yes
``inductor_partition_fn``   ``torch._inductor.compile_fx.partition_fn``             yes   yes
``compile_fx_inner``        ``torch._inductor.compile_fx.compile_fx_inner``         yes   yes
``default_partition``       ``torch._functorch.partitioners.default_partition``     yes   yes
``InductorChoices``         ``torch._inductor.choices.InductorChoices``             yes   yes
``V``                       ``torch._inductor.virtualized.V``                       yes   yes
``is_wait``                 ``torch._inductor.utils.is_wait``                       yes   yes
``is_collective``           ``torch._inductor.utils.is_collective``                 yes   yes
``run_and_get_code``        ``torch._inductor.utils.run_and_get_code``              yes   yes
``C_SET_GRAD_ENABLED``      ``torch._C._set_grad_enabled``                          yes   yes
``dynamo_reset()``          ``torch._dynamo.reset()``                               yes   yes
``default_group()``         ``torch.distributed.distributed_c10d._get_default_group()`` yes yes
``default_store()``         ``torch.distributed.distributed_c10d._get_default_store()`` yes yes
``process_group_names()``   ``torch.distributed.distributed_c10d._world.pg_names``  yes   yes
``profiler_enabled()``      ``torch.autograd.profiler._is_profiler_enabled``        yes   yes
=========================== ====================================================== ===== =====
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

#: name -> (torch module, attribute in it; None for the module itself). Imported on first use.
LAZY: dict[str, tuple[str, str | None]] = {
    "aot_autograd": ("torch._dynamo.backends.common", "aot_autograd"),
    "unset_fake_temporarily": ("torch._subclasses.fake_tensor", "unset_fake_temporarily"),
    "funcol": ("torch.distributed._functional_collectives", None),
    "TorchDispatchMode": ("torch.utils._python_dispatch", "TorchDispatchMode"),
    "create_work_from_future": ("torch._C._distributed_c10d", "_create_work_from_future"),
    "resolve_process_group": ("torch.distributed.distributed_c10d", "_resolve_process_group"),
    "inductor_config": ("torch._inductor.config", None),
    "select_decomp_table": ("torch._inductor.decomposition", "select_decomp_table"),
    "inductor_partition_fn": ("torch._inductor.compile_fx", "partition_fn"),
    "compile_fx_inner": ("torch._inductor.compile_fx", "compile_fx_inner"),
    "default_partition": ("torch._functorch.partitioners", "default_partition"),
    "InductorChoices": ("torch._inductor.choices", "InductorChoices"),
    "V": ("torch._inductor.virtualized", "V"),
    "is_wait": ("torch._inductor.utils", "is_wait"),
    "is_collective": ("torch._inductor.utils", "is_collective"),
    "run_and_get_code": ("torch._inductor.utils", "run_and_get_code"),
}

#: The grad-mode switch recorded as a call_function target in captured graphs.
C_SET_GRAD_ENABLED = torch._C._set_grad_enabled


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def dynamo_reset() -> None:
    """``torch._dynamo.reset()``: forget every compiled frame."""
    import torch._dynamo

    torch._dynamo.reset()


def default_group() -> Any:
    """The default (world) process group."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_group()


def default_store() -> Any:
    """The default process group's store."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def process_group_names() -> Any:
    """The live process groups' names, keyed by group."""
    import torch.distributed as dist

    return dist.distributed_c10d._world.pg_names


def profiler_enabled() -> bool:
    """Whether a ``torch.profiler`` session is recording now (another cannot start inside it)."""
    import torch.autograd.profiler as profiler

    return bool(getattr(profiler, "_is_profiler_enabled", False))

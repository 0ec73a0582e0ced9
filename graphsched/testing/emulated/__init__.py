"""An emulated interconnect: one process on one device plays one rank of an N-rank group.

``init_emulated_process_group(virtual_size=8, bandwidth_gbps=25)`` initialises ``torch.distributed``
with graphsched's own backend, ``"graphsched_emulated"``, written in Python
(:class:`EmulatedProcessGroup`, a ``dist.ProcessGroup`` subclass). The group reports
``size() == virtual_size`` and ``rank() == 0``, so a model built on it is the model of one rank of an
N-way expert-parallel group (``MoEGPT`` holds ``num_experts / N`` local experts, its reshapes see N,
DeepSpeed's ``MoE(ep_size=N)`` builds its groups as on a real cluster), and every collective goes
through the same entry points as NCCL's: functional collectives (what ``torch.compile``, inductor's
compute/communication reordering and graphsched capture) and plain ``torch.distributed`` calls (what
DeepSpeed makes).

What a collective does:

* **Data.** The peers are replicas of this rank: every "peer" contributes this rank's own input. An
  all-to-all returns its input (the right shape, and finite values), an all-gather N copies, a SUM
  all-reduce N times the input (MAX/MIN/AVG leave it unchanged). Numerics are not the point: every
  figure taken on this backend is an emulation and must be labelled so.
* **Time.** A rank of an N-way group sends ``wire_bytes`` to its peers: ``(N-1)/N`` of the buffer
  for an all-to-all or reduce-scatter, ``2(N-1)/N`` for a ring all-reduce, ``(N-1)`` shards for an
  all-gather. On CUDA that time, ``wire_bytes / bandwidth + latency``, is spent by the GPU's copy
  engine: on a copy stream of the group's own, ``wire_bytes * copy_bandwidth / bandwidth`` bytes
  are copied device -> pinned host, where ``copy_bandwidth`` is the device-to-host rate measured
  once at start-up. Copy engines run beside the SMs (a matmul loop and a device-to-host copy do not
  slow each other), so the emulated link costs no compute, like a NIC, and the collective completes
  after the right time. ``bandwidth_gbps=math.inf`` moves no byte: the same step with communication
  removed (the compute-only limit).
* **Completion.** Each call returns a ``dist.Work`` wrapping a CUDA-aware future completed on the
  copy stream; ``wait()`` (``wait_tensor`` for a functional collective) makes the caller's current
  stream wait for it, without blocking the host: the semantics of NCCL's asynchronous collectives.

On CPU nothing is timed: the data are copied and the emulated bytes only counted (there is no copy
engine to run beside the compute). Every group keeps :class:`CollectiveStats` (calls, wire bytes,
copied bytes by kind) and can record the calls of a step (:meth:`EmulatedProcessGroup.recording`),
so a benchmark can replay the step's communication alone.

Groups made later with ``dist.new_group`` (DeepSpeed's expert-parallel groups) are emulated groups
too; they share the world group's :class:`EmulatedLink` (one rank has one link: their transfers
queue on the same copy stream) and its bandwidth, unless ``pg_options=EmulationOptions(...)`` says
otherwise.

The modules: ``link.py`` is the link model (``EmulationOptions``, ``wire_bytes``, the copy engine
and its bandwidth calibration, ``EmulatedLink``, and the ``CollectiveStats`` kept of every call);
``group.py`` the process group (``EmulatedProcessGroup``); ``backend.py`` its registration with
``torch.distributed`` and the set-up (``init_emulated_process_group``, ``new_emulated_group``).
"""

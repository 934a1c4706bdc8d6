"""Multi-process (multi-host) start-up through JAX's own distributed runtime.

Every process of a job runs the same command. On a TPU VM pod slice, SLURM or
Open MPI, `jax.distributed.initialize()` finds the coordinator, the process
count and this process's id by itself; elsewhere (e.g. several processes on one
machine) they are given as flags. Must run before anything touches a device.
"""

import os

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    os.environ.get("FCN_JAX_DISTRIBUTED", "auto"),
    ["auto", "on", "off"],
    "Start jax.distributed: 'auto' does when a coordinator is given or a "
    "multi-process cluster (SLURM, Open MPI, a multi-worker TPU VM) is detected; "
    "'on' always (JAX then finds the cluster itself). Default: "
    "$FCN_JAX_DISTRIBUTED, which scripts/tpu_vm.sh sets to 'on'.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordinator, for jobs JAX cannot detect itself.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (with --coordinator_address)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes)."
)

# Environment variables that name a multi-process job JAX can detect on its own.
_CLUSTER_VARIABLES = (
    "SLURM_JOB_ID",
    "OMPI_MCA_orte_hnp_uri",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _tpu_pod_workers() -> int:
    """Workers of this TPU VM slice (1 when not on a TPU VM)."""
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([name for name in hostnames.split(",") if name])


def is_multiprocess_environment() -> bool:
    return _tpu_pod_workers() > 1 or any(
        name in os.environ for name in _CLUSTER_VARIABLES
    )


def initialize_from_flags() -> None:
    """Starts jax.distributed as the flags and the environment ask; no-op for a
    single process."""
    explicit = _COORDINATOR.value is not None
    if explicit and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
        raise flags.ValidationError(
            "--coordinator_address needs --num_processes and --process_id."
        )
    mode = _DISTRIBUTED.value
    if mode == "off" or (
        mode == "auto" and not explicit and not is_multiprocess_environment()
    ):
        return
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )

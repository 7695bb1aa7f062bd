"""Data parallelism over every device with `jax.sharding`.

The devices form a 1-D mesh with one axis, ``'data'``. The batch axis of each
training and evaluation batch is split over that axis; everything else (params,
batch_stats, opt_state, anchors, anchor_mask, the step metrics and the training
and evaluation splits) is replicated on every device. A step is an ordinary
``jax.jit`` with these shardings, and the GSPMD partitioner inserts the
communication:

* Gradients. The loss is a mean over the global batch, so the gradient of the
  replicated params is a sum over the batch shards; XLA computes each device's
  part and all-reduces it. The update is then computed identically on every
  device, and params and opt_state stay replicated.
* BatchNorm. In training mode the batch mean and variance are means over the
  batch axis, which is sharded, so they are all-reduced too: the statistics are
  those of the global batch (synchronized BatchNorm), and the step equals the
  single-device step on the same global batch up to float rounding. This is
  unlike ``pmap`` data parallelism, where each device normalizes with its own
  shard's statistics unless the model names an axis to reduce over.

Multiple hosts: call `initialize_distributed` first thing in the program. The mesh
then spans the devices of all hosts; every process runs the same program on the
same values, and each jitted step is one computation over all devices. Each host
loads the whole training and evaluation split into its own memory and replicates
it onto its devices, so every host must load identical data (`replicate` does not
check this) and the data has to fit on every device, as it does on one; sharding
the splits over hosts is not implemented. Metrics come back replicated, so every
process can read them, but only process 0 should write metrics and logs (orbax
checkpointing, on the other hand, needs every process to take part).

Example:

    initialize_distributed()
    mesh = create_mesh()
    state = replicate(state, mesh)
    train_data, mean, std = replicate(
        (datasets.train, datasets.mean, datasets.std), mesh)
    step = train.compile_train_step(mesh)
    state, totals, _ = step(state, totals, train_data, replicate(order, mesh),
                            mean, std, penalty_config)

`train.train_and_evaluate` does this on every run; with one device the mesh has
one device and nothing is split.
"""

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any

# The name of the mesh axis that the batch is split over.
DATA_AXIS = 'data'

# Set by hand to launch one process per host without a cluster manager.
_COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'
_NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
_PROCESS_ID_ENV = 'JAX_PROCESS_ID'
# Set by the launchers whose settings `jax.distributed.initialize` reads itself.
_SLURM_ENV = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
_SLURM_TASKS_ENV = 'SLURM_NTASKS'
_OPEN_MPI_ENV = 'OMPI_MCA_orte_hnp_uri'
_OPEN_MPI_SIZE_ENV = 'OMPI_COMM_WORLD_SIZE'


def initialize_distributed() -> bool:
    """Connects the processes of a multi-host run; a no-op on a single host.

    Call it once, before anything else touches JAX. It calls
    ``jax.distributed.initialize()`` when the environment describes a run of more
    than one process, in one of three ways:

    * ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
      ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, set by hand on every host;
    * Slurm (``srun``) with more than one task: ``SLURM_JOB_ID``,
      ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID`` and
      ``SLURM_LOCALID``;
    * Open MPI (``mpirun``) with more than one process: ``OMPI_MCA_orte_hnp_uri``
      and ``OMPI_COMM_WORLD_SIZE``.

    Other clusters (Cloud TPU pods, Kubernetes) can call
    ``jax.distributed.initialize()`` directly, which detects them itself.

    Returns:
      Whether ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: if ``JAX_COORDINATOR_ADDRESS`` is set without valid
        ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    """
    environ = os.environ
    if _COORDINATOR_ENV in environ:
        num_processes = _int_from_env(_NUM_PROCESSES_ENV)
        process_id = _int_from_env(_PROCESS_ID_ENV)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f'{_PROCESS_ID_ENV}={process_id} must be in [0, '
                f'{_NUM_PROCESSES_ENV}={num_processes}).'
            )
        jax.distributed.initialize(
            coordinator_address=environ[_COORDINATOR_ENV],
            num_processes=num_processes,
            process_id=process_id,
        )
    elif (
        all(name in environ for name in _SLURM_ENV)
        and _int_from_env(_SLURM_TASKS_ENV, default=1) > 1
    ):
        jax.distributed.initialize(cluster_detection_method='slurm')
    elif _OPEN_MPI_ENV in environ and _int_from_env(_OPEN_MPI_SIZE_ENV, default=1) > 1:
        jax.distributed.initialize(cluster_detection_method='ompi')
    else:
        return False

    logging.info(
        'Process %d of %d; %d local and %d global devices.',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with the axis `DATA_AXIS` over ``devices``.

    Args:
      devices: the devices to use; None for all devices of all processes.

    Returns:
      The mesh. Its axis is of type ``Auto``, so that jitted functions are
      partitioned by GSPMD from their input and output shardings.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A whole copy of the array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over `DATA_AXIS`, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copies every array of ``tree`` to every device of ``mesh``.

    Use it once for the state and the data splits, and once per epoch for the
    epoch's order, so that the compiled steps receive arrays already placed as
    they expect instead of copying them on every call.

    Args:
      tree: a pytree of arrays and scalars: a `train.TrainState`, a
        `data.DeviceData` split, ... (`data.Datasets` is not a pytree: replicate
        its fields). On several hosts every leaf must hold the same value
        on every process (this is not checked) and be readable by this process:
        a NumPy array or scalar, an array on this process's devices, or an array
        already replicated.

    Returns:
      The same pytree with every array replicated over ``mesh``.
    """
    sharding = replicated_sharding(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    # jax.device_put would gather every leaf from every host to check that they
    # agree: the whole training split, once per host.
    return jax.tree.map(lambda leaf: _replicate_across_hosts(leaf, sharding), tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the mesh.

    Args:
      batch_size: the global batch size (``config.batch_size`` or
        ``config.eval_batch_size``).
      mesh: the mesh the batch will be split over.
    """
    num_shards = mesh.shape[DATA_AXIS]
    if batch_size % num_shards:
        raise ValueError(
            f'batch_size={batch_size} must be a multiple of the {num_shards} '
            'devices that it is split over.'
        )


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Puts a batch on the mesh with its leading axis split over the devices.

    Args:
      batch: a pytree of arrays with a common leading batch axis, e.g.
        ``{'image': f32[B, H, W, C], 'label': int32[B]}``; B must be a multiple
        of the number of devices.
      mesh: the mesh to put it on.

    Returns:
      The batch as global arrays sharded by `batch_sharding`.
    """
    for leaf in jax.tree.leaves(batch):
        check_batch_size(leaf.shape[0], mesh)
    return jax.device_put(batch, batch_sharding(mesh))


def constrain_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Inside jitted code: splits the batch axis of ``batch`` over the devices.

    A batch gathered inside a jitted step from replicated data is itself
    replicated; this constraint makes the partitioner split the rest of the step
    by examples.
    """
    return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def _replicate_across_hosts(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """A global array replicated as ``sharding`` says, from this host's copy."""
    value = np.asarray(jnp.asarray(leaf))
    return jax.make_array_from_callback(
        value.shape, sharding, lambda index: value[index]
    )


def _int_from_env(name: str, default: int | None = None) -> int:
    """The integer value of environment variable ``name``."""
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f'Environment variable {name} must be an integer, got {value!r}.'
        ) from None

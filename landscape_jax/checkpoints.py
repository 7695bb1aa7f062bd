"""Orbax checkpoints of a run: the training state and the ensemble snapshots.

A run directory holds

    WORKDIR/checkpoints/<epoch>/   the latest training states (a bounded number),
                                   from which a rerun resumes;
    WORKDIR/snapshots/<epoch>/     ensemble snapshots, never deleted: ``model``
                                   (``params`` and ``batch_stats``) and ``meta``
                                   (epoch, model name, classes, image shape).

Both are plain orbax `CheckpointManager` directories, so a snapshot can be read
with orbax alone; `load_snapshot` does that for this project's models.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any

CHECKPOINTS_DIR = 'checkpoints'
SNAPSHOTS_DIR = 'snapshots'
CONFIG_FILE = 'config.json'
# Opens a checkpoint directory for reading without creating anything.
READ_ONLY = ocp.CheckpointManagerOptions(create=False)


class DamagedSnapshotError(RuntimeError):
    """A snapshot whose files exist but cannot be restored."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One restored ensemble member.

    Attributes:
      epoch: the number of epochs trained when it was taken.
      variables: ``{'params': ..., 'batch_stats': ...}`` for ``model.apply``.
      meta: the model name, number of classes, image shape and dtype it was
        trained with.
    """

    epoch: int
    variables: PyTree
    meta: dict[str, Any]


class RunCheckpointer:
    """Saves and restores the training state and snapshots of one run directory.

    Args:
      workdir: the run directory; created if missing.
      config: the run's configuration, written to ``workdir/config.json``.
      model_meta: what a reader needs to rebuild the model of a snapshot
        (``model``, ``dtype``, ``num_classes``, ``image_shape``); stored with each.
      max_to_keep: how many training states to keep (snapshots are all kept).
      allow_config_change: accept a ``workdir`` made with another configuration
        (and record the new one); otherwise such a workdir is refused.

    Raises:
      ValueError: if ``workdir`` holds a run made with a different configuration
        and ``allow_config_change`` is False.
    """

    def __init__(
        self,
        workdir: str,
        config: ml_collections.ConfigDict,
        model_meta: dict[str, Any],
        max_to_keep: int = 2,
        allow_config_change: bool = False,
    ):
        self.workdir = run_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._model_meta = dict(model_meta)
        _check_same_config(workdir, config, allow_config_change)
        # Written whole or not at all: a kill leaves the previous config.
        partial = self.workdir / f'{CONFIG_FILE}.partial'
        partial.write_text(config.to_json(indent=2))
        partial.replace(self.workdir / CONFIG_FILE)
        self._states = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )
        self._snapshots = ocp.CheckpointManager(
            self.workdir / SNAPSHOTS_DIR,
            options=ocp.CheckpointManagerOptions(create=True),
        )

    def save_state(self, epoch: int, state: PyTree) -> None:
        """Saves the training state reached at the end of ``epoch``."""
        self._states.save(epoch, args=ocp.args.StandardSave(state))

    def restore_state(self, state: PyTree) -> tuple[PyTree, int]:
        """Restores the latest saved training state, if there is one.

        Args:
          state: a freshly initialized state; gives structure, shapes and dtypes.

        Returns:
          ``(state, epoch)``: the restored state and the epoch it ends, or the
          given state and 0 when the run directory holds no training state.
        """
        epoch = self._states.latest_step()
        if epoch is None:
            return state, 0
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self._states.restore(epoch, args=ocp.args.StandardRestore(abstract))
        return restored, int(epoch)

    def save_snapshot(self, epoch: int, state: PyTree) -> None:
        """Saves the model of ``state`` as the ensemble snapshot of ``epoch``.

        A snapshot already saved for ``epoch`` (by a run that was stopped before
        its training state of that epoch was saved) is kept as it is: the epoch
        is recomputed identically on resume, and a snapshot is never rewritten.
        """
        if epoch in self._snapshots.all_steps():
            logging.info('Snapshot of epoch %d exists; keeping it.', epoch)
            return
        meta = dict(self._model_meta, epoch=int(epoch))
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        self._snapshots.save(
            epoch,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)
            ),
        )
        logging.info('Saved snapshot of epoch %d.', epoch)

    def close(self) -> None:
        """Waits for pending writes and releases the managers."""
        for manager in (self._states, self._snapshots):
            manager.wait_until_finished()
            manager.close()


def run_path(workdir: str) -> epath.Path:
    """The run directory as a path orbax accepts: relative ones made absolute."""
    path = epath.Path(workdir)
    return path if path.is_absolute() else epath.Path(os.path.abspath(workdir))


def latest_state_epoch(workdir: str) -> int | None:
    """The epoch of the latest training state saved in ``workdir``, or None."""
    directory = run_path(workdir) / CHECKPOINTS_DIR
    if not directory.exists():
        return None
    with ocp.CheckpointManager(directory, options=READ_ONLY) as manager:
        epoch = manager.latest_step()
    return None if epoch is None else int(epoch)


def snapshot_epochs(workdir: str) -> list[int]:
    """The epochs of the snapshots saved in ``workdir``, oldest first."""
    directory = run_path(workdir) / SNAPSHOTS_DIR
    if not directory.exists():
        return []
    with ocp.CheckpointManager(directory, options=READ_ONLY) as manager:
        return sorted(manager.all_steps())


def load_snapshot(workdir: str, epoch: int) -> Snapshot:
    """Restores one snapshot of a run directory with orbax.

    The arrays are restored onto this host's default device, whichever devices
    wrote them, so that snapshots trained on an accelerator can be read anywhere.

    Args:
      workdir: the run directory.
      epoch: which snapshot (see `snapshot_epochs`).

    Returns:
      The restored `Snapshot`.

    Raises:
      FileNotFoundError: if the run has no snapshot of ``epoch``.
      DamagedSnapshotError: if the snapshot's files cannot be restored.
    """
    directory = run_path(workdir) / SNAPSHOTS_DIR
    saved_epochs = snapshot_epochs(workdir)
    if epoch not in saved_epochs:
        raise FileNotFoundError(
            f'No snapshot of epoch {epoch} in {directory}; '
            f'its snapshots are of epochs {saved_epochs}.'
        )
    try:
        return _restore_snapshot(directory, epoch)
    except Exception as error:  # Orbax and TensorStore raise many kinds.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DamagedSnapshotError(
            f'Snapshot {directory / str(epoch)} is damaged and cannot be '
            f'restored ({type(error).__name__}: {reason[:200]}).'
        ) from error


def _restore_snapshot(directory: epath.Path, epoch: int) -> Snapshot:
    handlers = {
        'model': ocp.PyTreeCheckpointHandler(),
        'meta': ocp.JsonCheckpointHandler(),
    }
    with ocp.CheckpointManager(
        directory, options=READ_ONLY, item_handlers=handlers
    ) as manager:
        saved = manager.item_metadata(epoch)['model'].tree
        restored = manager.restore(
            epoch,
            args=ocp.args.Composite(
                model=local_restore_args(saved), meta=ocp.args.JsonRestore()
            ),
        )
    return Snapshot(epoch=int(epoch), variables=restored.model, meta=restored.meta)


def local_restore_args(
    saved: PyTree, partial_restore: bool = False
) -> ocp.args.PyTreeRestore:
    """Orbax arguments restoring the arrays of ``saved`` onto the default device.

    Args:
      saved: the tree of a checkpoint item as its orbax metadata describes it
        (anything with ``shape`` and ``dtype`` leaves).
      partial_restore: restore only the subtree given by ``saved``.

    Returns:
      `ocp.args.PyTreeRestore` for ``CheckpointManager.restore``.
    """
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding),
        saved,
    )
    return ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial_restore,
    )


def _check_same_config(
    workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool
) -> None:
    """Refuses a workdir whose recorded configuration differs from ``config``."""
    recorded = read_config(workdir)
    if recorded is None or allow_config_change:
        return
    differing = _differing_fields(recorded, json.loads(config.to_json()))
    if differing:
        shown = ', '.join(
            f'{name} ({old!r} -> {new!r})' for name, old, new in differing
        )
        raise ValueError(
            f'workdir={str(workdir)!r} holds a run made with a different config: '
            f'{shown}. Use another workdir, or pass --allow_config_change to '
            'continue this run with the new config.'
        )


def _differing_fields(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ''
) -> list[tuple[str, Any, Any]]:
    """(dotted name, old value, new value) for each field that differs."""
    differing = []
    for key in sorted(set(old) | set(new)):
        name = f'{prefix}{key}'
        old_value, new_value = old.get(key), new.get(key)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            differing += _differing_fields(old_value, new_value, f'{name}.')
        elif old_value != new_value:
            differing.append((name, old_value, new_value))
    return differing


def read_config(workdir: str) -> dict[str, Any] | None:
    """The configuration a run directory was made with, or None."""
    path = epath.Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None

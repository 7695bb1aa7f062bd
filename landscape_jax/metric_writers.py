"""Per-epoch metrics: a JSON-lines file, TensorBoard events and a log line."""

import json
import math
from typing import Any

import jax
from absl import logging
from etils import epath

METRICS_FILE = 'metrics.jsonl'

# Shown in the per-epoch log line, in this order, when present.
_LOGGED = (
    'train_loss',
    'train_accuracy',
    'penalty',
    'eval_loss',
    'eval_accuracy',
    'learning_rate',
    'epoch_time',
)


class MetricWriter:
    """Writes one record per epoch to ``workdir/metrics.jsonl`` and TensorBoard.

    Args:
      workdir: the run directory.
      resume_after_epoch: the last epoch whose training state was restored; lines
        of later epochs (written after that state was saved) are dropped, so that
        a resumed run never repeats an epoch.
    """

    def __init__(self, workdir: str, resume_after_epoch: int = 0):
        self._path = epath.Path(workdir) / METRICS_FILE
        # In a multi-host run every process computes the same metrics; one writes.
        self._writes = jax.process_index() == 0
        if not self._writes:
            return
        kept = [r for r in read_metrics(workdir) if r['epoch'] <= resume_after_epoch]
        self._path.write_text(''.join(json.dumps(record) + '\n' for record in kept))
        # Imported here: it loads TensorFlow, whose start-up notices on stderr a
        # command that ends on bad input should not print.
        from flax.metrics import tensorboard

        self._summary = tensorboard.SummaryWriter(str(workdir))

    def write(self, epoch: int, metrics: dict[str, float]) -> None:
        """Records the metrics of one epoch."""
        if not self._writes:
            return
        record = {'epoch': int(epoch), **metrics}
        with self._path.open('a') as file:
            file.write(json.dumps(record) + '\n')
        for name, value in metrics.items():
            self._summary.scalar(name, value, epoch)
        self._summary.flush()
        shown = ', '.join(
            f'{name}={metrics[name]:.4g}' for name in _LOGGED if name in metrics
        )
        logging.info('epoch %d: %s', epoch, shown)

    def close(self) -> None:
        if self._writes:
            self._summary.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory, in the order written."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise
            # A run killed while appending leaves a partial last line; that
            # epoch is recomputed when the run resumes.
            logging.warning('Ignoring the partial last line of %s.', path)
    return records


def is_finite(metrics: dict[str, float]) -> bool:
    """Whether every number in ``metrics`` is finite."""
    return all(math.isfinite(value) for value in metrics.values())

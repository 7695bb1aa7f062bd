"""Prints a Markdown summary of a run directory: per-epoch metrics and artifacts.

python experiments/summarize_run.py --workdir=runs/mnist5k
"""

from absl import app, flags
from etils import epath

from landscape_jax import checkpoints, metric_writers

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to summarize.')
flags.mark_flag_as_required('workdir')

_COLUMNS = (
    ('epoch', 'epoch', '{:d}'),
    ('learning_rate', 'lr', '{:.4g}'),
    ('train_loss', 'train CE', '{:.4f}'),
    ('train_accuracy', 'train acc', '{:.4f}'),
    ('penalty', 'penalty', '{:.4f}'),
    ('eval_loss', 'eval CE', '{:.4f}'),
    ('eval_accuracy', 'eval acc', '{:.4f}'),
    ('anchors', 'anchors', '{:d}'),
)


def main(argv: list[str]) -> None:
    del argv
    workdir = _WORKDIR.value
    records = metric_writers.read_metrics(workdir)
    if not records:
        raise app.UsageError(f'--workdir={workdir} holds no metrics.jsonl records.')
    num_slots = 1 + max(
        (
            int(key.split('/')[1])
            for r in records
            for key in r
            if key.startswith('distance/')
        ),
        default=-1,
    )

    header = [title for _, title, _ in _COLUMNS]
    header += [f'‖θ − anchor {slot}‖' for slot in range(num_slots)]
    header.append('epoch time (s)')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + ' --- |' * len(header))
    for record in records:
        cells = [fmt.format(record[key]) for key, _, fmt in _COLUMNS]
        for slot in range(num_slots):
            value = record.get(f'distance/{slot}')
            cells.append('' if value is None else f'{value:.4f}')
        cells.append(f'{record["epoch_time"]:.1f}')
        print('| ' + ' | '.join(cells) + ' |')

    root = epath.Path(workdir)
    print()
    snapshots = checkpoints.snapshot_epochs(workdir)
    print(f'Snapshots (orbax, `snapshots/`): epochs {snapshots}')
    states = sorted(
        int(p.name) for p in (root / 'checkpoints').iterdir() if p.name.isdigit()
    )
    print(f'Training states (orbax, `checkpoints/`): epochs {states}')
    events = sorted(p.name for p in root.glob('events.out.tfevents.*'))
    print(f'TensorBoard event files: {len(events)}')


if __name__ == '__main__':
    app.run(main)

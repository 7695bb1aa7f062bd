"""Checks of a run's configuration and work directory, made before any work starts.

Every field of ``configs/default.py`` is checked for its type and range, so that a
typo on the command line fails at once instead of after the data set is loaded and
the step compiled. Each problem is reported as one line that names the field, says
what is allowed and shows the value, in the wording the other modules of this
package use::

    optimizer.momentum must be in [0, 1), got 1.5.

`validate_config` reports every problem of a configuration at once, one line each.
Whether a data set name or a split exists is left to `landscape_jax.data`, which
reports it in the same form when it loads the data.
"""

import itertools
import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import ml_collections
from etils import epath

from landscape_jax import checkpoints, conv, models, schedules

DTYPES = ('float32', 'bfloat16')

# jax.random.PRNGKey keeps only the low 32 bits of a seed (without jax_enable_x64),
# and the run also derives a key from seed + 1.
MAX_SEED = 2**32 - 2

_MISSING = object()


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of a run's configuration.

    Fields are those of ``configs/default.py``. The fields of ``config.schedule``
    that the chosen schedule does not read are not checked.

    Args:
      config: the run's configuration.

    Raises:
      ValueError: if a field is missing or has a value of the wrong type or out
        of range. The message has one line per problem, e.g.
        ``num_epochs must be a positive integer, got 0.``
    """
    problems = _ConfigChecks(config).run()
    if problems:
        raise ValueError('\n'.join(problems))


def validate_workdir(
    workdir: str | os.PathLike[str],
    config: ml_collections.ConfigDict | None = None,
) -> None:
    """Checks that a run can write to ``workdir`` and, on a resume, continue there.

    A local ``workdir`` must be a writable directory, or a path whose nearest
    existing ancestor is a writable directory, so that it can be created. Remote
    paths (``gs://...``) are not checked. When ``config`` is given and ``workdir``
    holds a saved training state, the fields that fix the structure of that state
    (``model.name`` and the number of ``distance.anchor_epochs``) must equal
    those the run was started with: with other values the state cannot be
    restored.

    Args:
      workdir: the run directory.
      config: the configuration of the run about to start, or None to check only
        that the directory can be written.

    Raises:
      ValueError: naming ``workdir`` or the conflicting field, with its value and
        what is allowed.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise ValueError(f'workdir must be a non-empty path, got {workdir!r}.')
    path = os.fspath(workdir)
    if '://' in path:
        return

    problem = _workdir_problem(path)
    if problem:
        raise ValueError(
            'workdir must be a writable directory or a path where one can be '
            f'created, got {path!r} ({problem}).'
        )
    if config is not None:
        problems = _resume_problems(path, config)
        if problems:
            raise ValueError('\n'.join(problems))


def is_input_error(error: BaseException, config: ml_collections.ConfigDict) -> bool:
    """Whether ``error`` reports a bad value of a configuration field or workdir.

    This package reports bad input as a ValueError whose message starts with the
    field it is about, as in ``data.name='foo' is not a tfds data set ...`` or
    ``schedule.decay_rate must be in (0, 1], got 2.0.``; the main command prints
    those without a traceback.

    Args:
      error: the exception raised.
      config: the run's configuration, whose field names are recognized.

    Returns:
      True if ``error`` is a ValueError whose message starts with ``workdir`` or
      the dotted path of a field of ``config``, followed by a space or ``=``.
    """
    if not isinstance(error, ValueError):
        return False
    message = str(error)
    field = message.replace('=', ' ').split(' ', 1)[0]
    if not field or not message.startswith((f'{field} ', f'{field}=')):
        return False
    return field == 'workdir' or _get(config, field) is not _MISSING


class _ConfigChecks:
    """Collects the problems of one configuration, one line each."""

    def __init__(self, config: ml_collections.ConfigDict):
        self._config = config
        self._problems: list[str] = []

    def run(self) -> list[str]:
        """Checks every field; returns the problems found, in field order."""
        self._integer('seed', 0, MAX_SEED)
        num_epochs = self._integer('num_epochs', 1)
        self._integer('batch_size', 1)
        self._integer('eval_batch_size', 1)
        self._integer('checkpoints_to_keep', 1)

        self._choice('model.name', models.MODEL_NAMES)
        self._choice('model.dtype', DTYPES)
        self._choice('model.conv_impl', conv.CONV_IMPL_CHOICES)

        self._string('data.name')
        self._string('data.data_dir', optional=True)
        self._string('data.manual_dir', optional=True)
        self._string('data.train_split')
        self._string('data.eval_split')

        learning_rate = self._finite('optimizer.learning_rate', positive=True)
        self._number('optimizer.momentum', 'in [0, 1)', lambda x: 0 <= x < 1)
        self._finite('optimizer.weight_decay', positive=False)

        self._schedule(learning_rate)

        self._finite('distance.strength', positive=False)
        self._finite('distance.width', positive=True)
        self._anchor_epochs(num_epochs)
        return self._problems

    def _schedule(self, learning_rate: float | None) -> None:
        """Checks schedule.name and the fields that schedule reads."""
        name = self._choice('schedule.name', schedules.SCHEDULE_NAMES)
        if name == 'step':
            self._number('schedule.decay_rate', 'in (0, 1]', lambda x: 0 < x <= 1)
            self._integer('schedule.decay_epochs', 1)
            self._integer('schedule.restart_epochs', 1)
        elif name == 'cosine':
            self._integer('schedule.period_epochs', 1)
            if learning_rate is None:
                self._finite('schedule.end_value', positive=False)
            else:
                below = f'below optimizer.learning_rate={learning_rate!r}'
                self._number(
                    'schedule.end_value',
                    f'a number >= 0 and {below}',
                    lambda x: 0 <= x < learning_rate,
                )

    def _anchor_epochs(self, num_epochs: int | None) -> None:
        """Checks distance.anchor_epochs against num_epochs."""
        field = 'distance.anchor_epochs'
        last = 'num_epochs' if num_epochs is None else f'num_epochs={num_epochs}'
        allowed = f'a sequence of distinct integers in [1, {last}], in increasing order'
        epochs = self._value(field)
        if epochs is _MISSING or not isinstance(epochs, (tuple, list)):
            self._report(field, epochs, allowed)
            return
        top = math.inf if num_epochs is None else num_epochs
        in_range = all(_is_int(epoch) and 1 <= epoch <= top for epoch in epochs)
        if not (in_range and all(a < b for a, b in itertools.pairwise(epochs))):
            self._report(field, epochs, allowed)

    def _integer(
        self, field: str, minimum: int, maximum: int | None = None
    ) -> int | None:
        """Checks an integer field (not a bool); returns it, or None if invalid."""
        if maximum is None:
            allowed = (
                'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
            )
        else:
            allowed = f'an integer in [{minimum}, {maximum}]'
        value = self._value(field)
        top = math.inf if maximum is None else maximum
        if _is_int(value) and minimum <= value <= top:
            return value
        self._report(field, value, allowed)
        return None

    def _finite(self, field: str, *, positive: bool) -> float | None:
        """Checks a finite number > 0 (or >= 0); None if invalid."""
        if positive:
            return self._number(
                field, 'a finite number > 0', lambda x: 0 < x < math.inf
            )
        return self._number(field, 'a finite number >= 0', lambda x: 0 <= x < math.inf)

    def _number(
        self, field: str, allowed: str, is_allowed: Callable[[float], bool]
    ) -> float | None:
        """Checks a real-number field (ints too, not bools); None if invalid."""
        value = self._value(field)
        # NaN fails every comparison, so no range admits it.
        if _is_real(value) and is_allowed(value):
            return value
        self._report(field, value, allowed)
        return None

    def _choice(self, field: str, choices: tuple[str, ...]) -> str | None:
        """Checks a field that takes one of a few names; None if invalid."""
        value = self._value(field)
        if isinstance(value, str) and value in choices:
            return value
        self._report(field, value, f'one of {choices}')
        return None

    def _string(self, field: str, optional: bool = False) -> None:
        """Checks a non-empty string field, which may be None if optional."""
        value = self._value(field)
        if optional and value is None:
            return
        if isinstance(value, str) and value.strip():
            return
        allowed = 'a non-empty string'
        self._report(field, value, f'None or {allowed}' if optional else allowed)

    def _value(self, field: str) -> Any:
        """The field's value, or _MISSING."""
        return _get(self._config, field)

    def _report(self, field: str, value: Any, allowed: str) -> None:
        """Records one problem as a line naming the field, the rule and the value."""
        if value is _MISSING:
            self._problems.append(f'{field} is missing; it must be {allowed}.')
        else:
            self._problems.append(f'{field} must be {allowed}, got {value!r}.')


def _get(config: Any, field: str) -> Any:
    """The value at a dotted path of a ConfigDict (or dict), or _MISSING."""
    value = config
    for key in field.split('.'):
        try:
            value = value[key]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return value


def _workdir_problem(path: str) -> str | None:
    """Why a run could not write to the local directory ``path``, or None."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return 'it is a file'
        if not os.access(path, os.W_OK | os.X_OK):
            return 'it is not writable'
        return None

    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f'{ancestor!r} is a file'
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f'{ancestor!r} is not writable'
    return None


def _resume_problems(path: str, config: ml_collections.ConfigDict) -> list[str]:
    """Fields of ``config`` that conflict with the state saved in ``path``."""
    if not _holds_training_state(path):
        return []
    try:
        saved = checkpoints.read_config(path)
    except ValueError:  # An unreadable config.json: restoring will tell.
        return []
    if not saved:
        return []

    advice = f'to resume the run in workdir={path!r} (or use a new workdir)'
    problems = []
    field = 'model.name'
    saved_name, name = _get(saved, field), _get(config, field)
    if saved_name is not _MISSING and name != saved_name:
        problems.append(f'{field} must be {saved_name!r} {advice}, got {name!r}.')

    field = 'distance.anchor_epochs'
    saved_epochs, epochs = _get(saved, field), _get(config, field)
    sequences = isinstance(saved_epochs, (list, tuple)) and isinstance(
        epochs, (list, tuple)
    )
    if sequences and len(epochs) != len(saved_epochs):
        problems.append(
            f'{field} must hold {len(saved_epochs)} epochs, as '
            f'{tuple(saved_epochs)!r} does, {advice}, got {epochs!r}.'
        )
    return problems


def _holds_training_state(path: str) -> bool:
    """Whether a run directory holds a saved training state to resume from."""
    directory = epath.Path(path) / checkpoints.CHECKPOINTS_DIR
    return directory.is_dir() and any(
        entry.name.isdigit() for entry in directory.iterdir()
    )


def _is_int(value: Any) -> bool:
    """Whether value is an integer and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """Whether value is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

"""How the package's commands end on bad input: ``error:`` lines and status 2."""

import sys
from typing import NoReturn

# The exit status of a command given bad flags, a bad config or a bad work
# directory (as argparse and absl use for usage errors).
USAGE_ERROR_EXIT_CODE = 2


def exit_with_error(message: str) -> NoReturn:
    """Writes each line of ``message`` as an ``error:`` line and exits with status 2.

    Args:
      message: one problem per line; blank lines are dropped.
    """
    for line in message.splitlines():
        if line.strip():
            sys.stderr.write(f'error: {line.strip()}\n')
    sys.exit(USAGE_ERROR_EXIT_CODE)

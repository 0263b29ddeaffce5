"""What the top-level scripts share: bad input becomes one line on stderr and exit status 2."""
import sys
from contextlib import contextmanager

from ddpm.config import UserError


@contextmanager
def user_errors(program: str):
    try:
        yield
    except UserError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

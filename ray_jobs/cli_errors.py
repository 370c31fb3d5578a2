"""The CLI's one way of turning mistakes a user can fix into a one-line message."""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator

import click


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Mistakes a user can fix (a missing file, bad labels, options or weights) as a message, not a traceback."""
    import pandas as pd
    from botocore.exceptions import BotoCoreError

    from piqa_core.checkpoints import CheckpointError

    from .listing import ListingError
    from .storage import OutputUnreadable
    from .summary import RowsMissing

    try:
        yield
    except FileNotFoundError as e:
        raise click.ClickException(f"not found: {e.filename or e}") from None
    except RowsMissing as e:
        raise click.ClickException(str(e)) from None
    except (ListingError, OutputUnreadable, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise click.ClickException(f"{e.strerror}: {e.filename}" if e.filename and e.strerror else str(e)) from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise click.ClickException(f"cannot read the labels: {e}") from None
    except BotoCoreError as e:  # s3fs's listing and reads: no endpoint there, no credentials
        raise click.ClickException(f"object store: {type(e).__name__}: {e}") from None
    except (CheckpointError, ValueError) as e:  # LabelError, TrainSetupError, AuditRefused are ValueErrors
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a full disk or quota, a read-only mount, a store out of reach: the user's to fix
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise click.ClickException(f"{e.strerror}: {e.filename}" if e.filename else str(e)) from None
        if e.errno is None and "AWS Error" in str(e):  # pyarrow's S3 errors (endpoint, credentials, network)
            raise click.ClickException(f"object store: {e}") from None
        raise

"""The one base class of every error meant for the user (not a bug)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, options or environment; the message says what and how to fix it.

    :func:`pneumo_data.common.jobs.run_job` turns it into ``JOB: error: message`` with exit
    status 1 and no traceback. Any other exception is a bug and keeps its traceback.
    """

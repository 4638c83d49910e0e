"""The errors a user can cause. The CLI prints them as one line with exit code 2; anything else is a bug.

Every error class in mlic derives from :class:`MlicError` (itself a ``ValueError``, so code that
catches ValueError keeps working): a malformed annotation file, an unreadable image, a checkpoint
from elsewhere, an impossible setting. Each message names the file, field or option and the fix.
"""


class MlicError(ValueError):
    """Something a user can cause and fix; the message names the file or option and what to do."""

"""The one error type the planner raises for bad input.

Why a ``ValueError`` subclass: every planner failure is a problem with what the user asked for (a count out of
range, a weight that cannot be a proportion, an axis nobody defined), so callers that already catch
``ValueError`` keep working, while the CLI can catch exactly this type and turn it into a one-line message
instead of a traceback.
"""

from __future__ import annotations


class PlanError(ValueError):
    """Bad planner input; the message names the offending item and, where possible, what would be accepted."""

"""The ``restorer`` command: thin Click commands over the library.

``main`` (:mod:`.base`, with what every command shares: exit codes, the mapping of library
errors to them, the shared options) is the group; the commands register on it from
:mod:`.run` (restore, run, train), :mod:`.cluster` (submit, the jobs group) and :mod:`.tools`
(eval, convert, models, inspect, bench, shard, samples). See :mod:`.base` for the exit codes.
"""

from restorer.cli import cluster, run, tools  # noqa: F401 - registers the commands on main
from restorer.cli.base import main

__all__ = ["main"]

"""The HDF5 run log: one self-describing file per training run, written by rank 0 only.

`schema` holds every dataset and attribute (dtype, shape, units, meaning, when written) as data;
`writer.RunLogWriter` writes logs, `reader.open_log` reads them; `python -m cnnpar.runlog info PATH`
says what a log holds and in what state. This package does no MPI. docs/runlog.md documents it.
Nothing is ever pickled: the config is stored as its JSON text plus one attribute per field.
"""

from ._h5 import utc_now, utc_stamp
from .reader import RunLog, is_complete_log, open_log, summarize
from .schema import FORMAT, FORMAT_VERSION, SCHEMA, STATUSES
from .writer import PENDING_ROWS, RunLogWriter

__all__ = ["FORMAT", "FORMAT_VERSION", "STATUSES", "SCHEMA", "PENDING_ROWS", "RunLogWriter", "RunLog",
           "open_log", "is_complete_log", "summarize", "utc_now", "utc_stamp"]

"""python -m edgekit.profiling: one profile in this fresh process (compare's isolation), kwargs as
JSON on stdin, the report as JSON on stdout."""

from edgekit.profiling.comparison import child_main

child_main()

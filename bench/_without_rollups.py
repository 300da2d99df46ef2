"""`python bench/_without_rollups.py serve ...` is `gradwatch serve ...` with rollup maintenance switched off.

bench/query.py starts one beside a normal gradwatch to measure, side by side, what keeping the step rollups costs
ingest. Its database's rollups are wrong (downsampled reads from them would be too): for a benchmark only.
"""

from gradwatch.cli import main
from gradwatch_service import rollups

rollups.set_maintenance(False)
raise SystemExit(main())

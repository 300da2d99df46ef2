"""Storage: the database's tables, how values are stored per database (the dialect layer), the step
rollups, migrations, retention."""

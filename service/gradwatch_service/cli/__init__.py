"""The service's commands: `gradwatch serve`, `gradwatch db ...`, `gradwatch token ...`."""

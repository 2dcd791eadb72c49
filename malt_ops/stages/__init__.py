"""Pipeline stages: each module is one stage, one CLI subcommand and (later) one DAG task."""

"""The Prefect stages of the pipeline, one module each (see `tasks.stage` for their one shape),
over the Prefect-free core in `squadtune`."""

"""Pipeline stages: one module each, a thin Prefect task over plain functions."""

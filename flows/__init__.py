"""Prefect flows of the squadtune pipeline and its command line."""

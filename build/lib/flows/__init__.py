"""Prefect flows: orchestration of the DVC stages (no ML logic here)."""

"""Plumbing shared by the ModelForge services: bootstrap, settings, errors, database, paging, telemetry."""

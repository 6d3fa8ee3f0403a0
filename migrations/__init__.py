"""Alembic migrations of the kanfarm store (run with ``Store.upgrade()`` or ``kanfarm db upgrade``).

A package so the scripts ship inside the wheel; ``kanfarm.store.migrate`` points alembic here.
"""

"""The distributed pipeline without Celery, one module per concern: ``messages`` (what a
task message holds), ``ingest`` (studies found, recorded and sent), ``consume`` (a worker
screening a queued study), ``status`` (status and requeue), ``errors``.
``worker/tasks.py`` wraps ``consume.process_study`` in a thin Celery task.
"""

"""The deployment layer: the Celery app ``make worker`` runs, and example tasks."""

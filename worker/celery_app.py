"""The worker's Celery app: the shared configuration plus this package's tasks.

Importing this module must never import torch: prefork children forked from a parent that initialised torch
spin at 100% CPU forever (seen on this stack). Torch is imported inside the task, in the child.
"""

from __future__ import annotations

from app.queue import get_celery

celery_app = get_celery()
celery_app.conf.include = ["worker.tasks"]

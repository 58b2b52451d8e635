"""Training, evaluation and batch prediction for the cxr-screen classifier.

Stages, one module each: ``data`` (file lists and tf.data streams), ``models``
(architectures by name), ``train``, ``evaluate`` (with ``scoring``, ``metrics``,
``plots`` and the shortcut ``audit``), ``predict``; ``cli`` exposes them as
``cxr-screen train|evaluate|predict``. TensorFlow is imported lazily, inside the
functions that need it, so importing this package (or the worker CLI) stays cheap.
"""

from worker.model import CLASS_NAMES

POSITIVE_CLASS = CLASS_NAMES[1]

"""The desktop second-opinion viewer (``ich-viewer``).

Qt widgets live in ``qt_*.py`` as ``Qt*`` classes; ``scores``, ``overlay`` and
``export`` are plain Python so they can be tested without a display. The GUI
thread never imports TensorFlow: only :class:`viewer.workers.ModelWorker` reaches
it, through :mod:`ich_model`, on its own thread.
"""

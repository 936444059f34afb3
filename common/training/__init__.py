"""Training: one engine for one process and for N workers.

- :mod:`.settings`: what a run is asked to do (:class:`~.settings.TrainSettings`) and its errors;
- :mod:`.engine`: the loop (:class:`~.engine.Engine`), one process as a group of one
  (:class:`~.engine.LocalGroup`), the hooks (:class:`~.engine.Callback`) and ``evaluate``;
- :mod:`.callbacks`: progress, step records and checkpoints as hooks;
- :mod:`.rundir`: the run directory (files, atomic writes, the lock, what is kept);
- :mod:`.run`: ``train``, which puts them together for ``densenet train``, the pooling exercise
  and the notebooks.

Each name has one import path, its module's; importing this package imports no framework.
"""

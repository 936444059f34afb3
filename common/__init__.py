"""Framework-neutral core of densenet-suite. Importing it imports no framework.

The core sits at the top: ``config`` (the configuration and named configurations), ``arch`` (the
architecture walked once: plan, canonical tensors, counts), ``adapter`` and ``registry`` (the
backends by name), ``layout``, ``checks``, ``limits``, ``errors``, ``render`` and ``resources``.
The rest is grouped by role: ``weights`` (weight files), ``training`` (the engine), ``oracle``
(the float64 numpy reference and golden vectors), ``verify`` (parity, the shape harness, the
summary), ``process`` (threads, allocator, process lifetimes), ``distributed``, ``data``,
``bench``, ``teach`` and ``cli``. Each public name has one import path: its module's.
"""

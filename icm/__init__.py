"""icm: In-Context Meta LoRA generation, the Ray-free core library.

Nothing in this package imports ``ray``: the Ray entry points live in ``jobs/`` and
``serve_apps/`` and wire these functions into Ray Train, Data, Tune and Serve.
"""

__version__ = "0.1.0"

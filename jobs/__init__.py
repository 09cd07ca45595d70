"""Ray entry points: thin shells that wire the Ray-free `icm` library into Ray.

Each module runs as ``python -m jobs.NAME --config PRESET [key=value ...]``.
"""

"""Ray entry points: thin shells that wire the Ray-free `icm` library into Ray.

Each module runs as ``python -m jobs.NAME --config PRESET [key=value ...]``.
"""

from pathlib import Path

from icm.config import register_preset_dir

PRESETS = Path(__file__).resolve().parent / "configs"
register_preset_dir(PRESETS)  # `--config demo` finds jobs/configs/demo.yaml

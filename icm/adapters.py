"""Loading peft LoRA adapters onto a base model, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path

from icm.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(InputError):
    """An adapter directory that cannot be applied; the message names the file or field."""


def check_adapter_dir(adapter_dir: str | Path) -> dict:
    """Check the peft file set and return the parsed ``adapter_config.json``."""
    folder = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder} is not a peft adapter: {name} is missing. Fix: pass a "
                               "directory written by PeftModel.save_pretrained or `icm generate`.")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} is not valid JSON ({err.msg}).") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: field 'peft_type' is "
                           f"{config.get('peft_type')!r}; only LORA adapters are supported.")
    return config


def apply_adapter(model, adapter_dir: str | Path):
    """Wrap ``model`` in a ``PeftModel`` with the adapter at ``adapter_dir`` (eval mode)."""
    from peft import PeftModel

    config = check_adapter_dir(adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise AdapterError(
            f"adapter {adapter_dir} does not fit this base model (adapter was made for "
            f"{config.get('base_model_name_or_path')!r}; target modules "
            f"{config.get('target_modules')}): {str(err).splitlines()[0]}") from None
    peft_model.eval()
    return peft_model

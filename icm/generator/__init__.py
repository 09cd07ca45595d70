"""The LoRA generator: task vector in, LoRA adapter out.

    archs      the registry of architectures (mlp, conv1d, hyper) and their model spaces
    networks   the CVAE and its mlp / conv1d networks; hyper: the per-module hypernetwork
    inputs     reading the zoo and task vectors from storage (held-out tasks dropped there)
    data       split, normalisation, model-space encoding, sample sets
    training   the training loop, checkpoints, `train_generator`
    artifact   `LoraGenerator`: the saved, self-contained generator

The names below are imported on first use, so that `icm.config` can check an arch name
against the registry without importing torch or itself.
"""

from importlib import import_module

_EXPORTS = {
    "LoraGenerator": "artifact", "FORMAT": "artifact", "GENERATION_FILE": "artifact",
    "META_FILE": "artifact", "WEIGHTS_FILE": "artifact", "prepare_data": "data",
    "load_generator_inputs": "inputs", "GeneratorInputs": "inputs", "GeneratorInputError": "inputs",
    "ConditionMismatchError": "inputs", "ZooInputError": "inputs", "ZooData": "inputs",
    "train_generator": "training", "fit_generator": "training", "generator_from_state": "training",
    "build_cvae": "training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'icm.generator' has no attribute {name!r}")
    return getattr(import_module(f"icm.generator.{_EXPORTS[name]}"), name)

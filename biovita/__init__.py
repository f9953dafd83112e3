"""biovita: align animal sounds with BioCLIP 2's images and names (the BioVITA method).

Library entry points (imported lazily, so `import biovita` stays light):
    create_model(cfg_or_name)   build the tri-modal model (tiny, bioclip2-clap, ...)
    load_model(path)            load a trained checkpoint folder (safetensors, no pickle)
    Predictor(checkpoint)       rank species/genera/families for audio or image files
    Rank                        species | genus | family
    list_models(pattern)        the registered model names
    load_config(path, overrides) a typed run configuration
"""

__version__ = "0.1.0"
__all__ = ["create_model", "load_model", "Predictor", "Rank", "list_models", "load_config",
           "__version__"]

_LAZY = {
    "create_model": ("biovita.models.factory", "create_model"),
    "load_model": ("biovita.models.checkpoint", "load_model"),
    "Predictor": ("biovita.predict", "Predictor"),
    "Rank": ("biovita.predict", "Rank"),
    "list_models": ("biovita.models.registry", "list_models"),
    "load_config": ("biovita.config", "load_config"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'biovita' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)

"""biovita: align animal sounds with BioCLIP 2's images and names (the BioVITA method).

Library entry points (imported lazily, so `import biovita` stays light):
    create_model(cfg_or_name)   build the tri-modal model (tiny, bioclip2-clap, ...)
    load_model(path)            load a trained checkpoint folder (safetensors, no pickle)
    Predictor(checkpoint)       rank species/genera/families for audio or image files
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "create_model":
        from biovita.models.factory import create_model

        return create_model
    if name == "load_model":
        from biovita.models.checkpoint import load_model

        return load_model
    if name in ("Predictor", "Rank"):
        from biovita import predict

        return getattr(predict, name)
    if name == "list_models":
        from biovita.models.registry import list_models

        return list_models
    raise AttributeError(f"module 'biovita' has no attribute {name!r}")

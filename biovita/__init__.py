"""biovita: align animal sounds with BioCLIP 2's images and names (the BioVITA method)."""

__version__ = "0.1.0"

"""Model surgery for the edge-cloud split.  For now: loading the embedded pretrained model.

Must not import channel/, data/ or runtime/.
"""
from .pretrained import boundary_activations, load_minilm, minilm_path

__all__ = ["boundary_activations", "load_minilm", "minilm_path"]

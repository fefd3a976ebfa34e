"""Model surgery for the edge-cloud split: ``split_model``, per-family adapters, the embedded model.

Must not import channel/, data/ or runtime/.
"""
from .boundary_output import BoundaryOutput
from .pretrained import boundary_activations, load_minilm, minilm_path
from .simulated import SimulatedSplit, StepBytes
from .surgery import CloudModel, EdgeModel, merge, split_model

__all__ = ["BoundaryOutput", "CloudModel", "EdgeModel", "boundary_activations", "load_minilm", "merge", "minilm_path",
           "SimulatedSplit", "split_model", "StepBytes"]

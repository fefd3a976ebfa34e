"""Model surgery for the edge-cloud split: ``split_model``, per-family adapters, the embedded model.

Must not import channel/, data/ or runtime/.
"""
from .boundary_output import BoundaryOutput
from .export import load_split_model, save_split_model
from .pretrained import boundary_activations, load_minilm, minilm_classifier, minilm_path
from .rng import part_rng, part_seed, seeded
from .simulated import SimulatedSplit, StepBytes, codec_seed
from .surgery import CloudModel, EdgeModel, merge, split_model

__all__ = ["BoundaryOutput", "CloudModel", "EdgeModel", "boundary_activations", "load_minilm", "load_split_model",
           "merge", "minilm_classifier", "minilm_path", "codec_seed", "part_rng", "part_seed", "seeded", "save_split_model",
           "SimulatedSplit", "split_model", "StepBytes"]

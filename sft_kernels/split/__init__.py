"""Model surgery for the edge-cloud split: ``split_model``, per-family adapters, the embedded model.

Must not import channel/, data/ or runtime/.
"""
from .boundary_output import BoundaryOutput
from .calibrate import CalibrationOptions, CalibrationReport
from .export import load_split_model, save_split_model
from .pretrained import (EMBEDDED_MODEL, boundary_activations, load_classifier, load_minilm, minilm_classifier,
                         minilm_path, model_inputs, supported_model_types)
from .rng import codec_seed, part_rng, part_seed, seeded
from .surgery import UNFITTED, CloudModel, EdgeModel, TopModel, merge, split_model

__all__ = ["CalibrationOptions", "CalibrationReport",
           "EMBEDDED_MODEL", "load_classifier", "model_inputs", "supported_model_types",
           "BoundaryOutput", "CloudModel", "EdgeModel", "boundary_activations", "load_minilm", "load_split_model",
           "merge", "minilm_classifier", "minilm_path", "codec_seed", "part_rng", "part_seed", "seeded", "save_split_model",
           "split_model", "TopModel", "UNFITTED"]

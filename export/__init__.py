"""Export of pruned models: CSR safetensors files and ONNX graphs (plus the sparse runtime).

    from moduli_transform.export import save_safetensors, load_safetensors, to_onnx, run_onnx
    save_safetensors(handle, "model.safetensors")          # masks, embeddings, config recorded
    model.load_state_dict(load_safetensors("model.safetensors"), strict=True)
    report = to_onnx(model, (example,), "model.onnx", sparse_initializers=True)

The library ``moduli_transform`` never imports this package; this package imports it.
"""

from .safetensors_format import (
    ExportFormatError, LoadedExport, save_safetensors, load_safetensors, read_safetensors,
)
from .onnx_export import (
    OnnxExportError, SequenceLengthError, InitializerMapping, OnnxExportReport, to_onnx, run_onnx,
)

__all__ = [
    "save_safetensors", "load_safetensors", "read_safetensors", "LoadedExport", "ExportFormatError",
    "to_onnx", "run_onnx", "OnnxExportReport", "InitializerMapping", "OnnxExportError",
    "SequenceLengthError",
]

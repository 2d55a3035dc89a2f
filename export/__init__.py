"""The export stage: a trained checkpoint in, verified deployable artifacts out.

Modules (heavy runtimes are imported inside functions, so importing this package is cheap):

* :mod:`export.onnx_format` -- torch -> ONNX FP32 (dynamo exporter, dynamic batch and H/W), node -> module
  scopes for per-module exclusions, atomic ONNX writing with embedded metadata.
* :mod:`export.fp16` -- FP16 ONNX with a block list of nodes kept in FP32 (final activation,
  unbounded attention products, and every node whose observed output overflows FP16).
* :mod:`export.calibration` -- calibration and held-out evaluation image sets, never overlapping.
* :mod:`export.quantize` -- INT8 Q/DQ ONNX (ONNX Runtime ``quantize_static``) and INT8 OpenVINO IR
  (NNCF), both with exclusion lists so that sensitivity analysis can call them per node group.
* :mod:`export.openvino_format` -- OpenVINO IR FP32 / FP16 / INT8, saved atomically (.bin then .xml).
* :mod:`export.tensorrt_format` -- TensorRT engine plans (profile shapes, build path per TensorRT
  version, ``trtexec`` equivalents) and the thin TensorRT build itself.
* :mod:`export.verify` -- accuracy of an artifact against the FP32 PyTorch reference and the gates.
* :mod:`export.metadata` -- the record each artifact carries (sidecar + ONNX ``metadata_props``).
* :mod:`export.report` -- progress reporting and the summary table.
* :mod:`export.pipeline` -- what ``resunetpp export`` runs.
"""

if __name__ != "resunetpp.export":  # the folder `export/` installs as `resunetpp.export`; never as a second, bare copy
    raise ImportError(f"import resunetpp.export, not {__name__}: this folder is installed as resunetpp.export "
                      "(pip install -e . or pip install resunetpp)")




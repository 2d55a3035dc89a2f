"""The export stage: a trained checkpoint in, verified deployable artifacts out.

Modules (heavy runtimes are imported inside functions, so importing this package is cheap):

* :mod:`resunetpp.export.pipeline` -- what ``resunetpp export`` runs (:func:`~resunetpp.export.pipeline.run_export`): targets,
  the output folder, then each format's steps in order.
* :mod:`resunetpp.export.options` / :mod:`resunetpp.export.results` -- the export's options and its report.
* :mod:`resunetpp.export.formats` -- the formats and precisions, and each artifact's file name.
* :mod:`resunetpp.export.context` -- one export in progress (:class:`~resunetpp.export.context.ExportRun`): what every format's
  steps share (record, verification through :mod:`resunetpp.engines`, gate, report entry).
* :mod:`resunetpp.export.inputs` -- the calibration / held-out image sets and the verification set.
* :mod:`resunetpp.export.outdir` -- the output folder's lock and stale-file cleanup.
* :mod:`resunetpp.export.onnx_format` -- the ONNX format: FP32 (verified against PyTorch), FP16, INT8 Q/DQ.
* :mod:`resunetpp.export.openvino_format` -- OpenVINO IR FP32 / FP16 / INT8, saved atomically (.bin then .xml).
* :mod:`resunetpp.export.tensorrt_format` -- TensorRT engines (the thin build, the INT8 entropy calibrator);
  :mod:`resunetpp.export.tensorrt_plan` -- build paths per TensorRT version, profiles, ``trtexec`` equivalents.
* :mod:`resunetpp.export.onnx_graph` -- torch -> ONNX FP32 (dynamo exporter, dynamic batch and H/W), node -> module
  scopes for per-module exclusions, atomic ONNX writing with embedded metadata.
* :mod:`resunetpp.export.fp16` -- FP16 ONNX with a block list of nodes kept in FP32 (final activation,
  unbounded attention products, and every node whose observed output overflows FP16).
* :mod:`resunetpp.export.calibration` -- calibration and held-out evaluation image sets, never overlapping.
* :mod:`resunetpp.export.quantize` -- INT8 Q/DQ ONNX (ONNX Runtime ``quantize_static``) and INT8 OpenVINO IR
  (NNCF), both with exclusion lists so that sensitivity analysis can call them per node group.
* :mod:`resunetpp.export.int8_source` -- the FP32 model INT8 artifacts are quantized from (equalized,
  bias-corrected); :mod:`resunetpp.export.equalize`, :mod:`resunetpp.export.bias_correction`, :mod:`resunetpp.export.ranges`;
  :mod:`resunetpp.export.channel_tails` -- every range of the default recipe from one ONNX Runtime pass over the
  FP32 graph (equalization maxima, then the equalized tensors' exact percentiles);
  :mod:`resunetpp.export.fast_calibration` -- ONNX Runtime's histograms for the other methods.
* :mod:`resunetpp.export.quantsim` -- simulated INT8 (fake quantization) in PyTorch; :mod:`resunetpp.export.qat` fine-tunes
  through it; :mod:`resunetpp.export.sensitivity` -- the per-group INT8 sensitivity search.
* :mod:`resunetpp.export.verify` -- accuracy of an artifact against the FP32 PyTorch reference and the gates.
* :mod:`resunetpp.export.metadata` -- the record each artifact carries (sidecar + ONNX ``metadata_props``).
* :mod:`resunetpp.export.report` -- progress reporting and the summary table.
"""

if __name__ != "resunetpp.export":  # the folder `export/` installs as `resunetpp.export`; never as a second, bare copy
    raise ImportError(f"import resunetpp.export, not {__name__}: this folder is installed as resunetpp.export "
                      "(pip install -e . or pip install resunetpp)")




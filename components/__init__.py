"""The pipeline's stages, one module each: data, model, trainer, evaluator, exporter, report."""

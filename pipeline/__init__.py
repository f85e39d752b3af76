"""The pipeline: typed config, CLI entry points, the order of the components, the run dir."""

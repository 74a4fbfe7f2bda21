"""Recorded runs read back: the MLflow run history, seed sweeps and paired tests. No pipeline
module is imported from here."""

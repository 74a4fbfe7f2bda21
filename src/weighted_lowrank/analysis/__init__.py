"""Recorded runs read back: the MLflow run history, seed sweeps, paired tests and the summary a
run ends with. No pipeline module is imported from here."""

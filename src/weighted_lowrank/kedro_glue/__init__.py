"""What Kedro needs from this project: typed parameter models, hooks, lineage checks, the Dask
runner and custom datasets. Imports the core and ``hf``; no pipeline module."""

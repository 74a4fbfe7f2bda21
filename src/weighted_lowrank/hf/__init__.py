"""Hugging Face models and text: loading, batching, the training and evaluation loops, latency,
local text files. Imports the numerical core and transformers, never Kedro."""

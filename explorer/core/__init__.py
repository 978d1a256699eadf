"""The core: the traced pass and everything it needs (devices, adapters, metrics, memory, cache).

engine.py is the only module that opens an nnsight trace or takes a model's lock; scheduler.py plans
the passes of a patching sweep; cache.py keeps activations and results; prompts.py turns text into a
checked token pair. May import: torch, transformers, nnsight, and other explorer.core modules. Never
explorer.sources, explorer.analyses, explorer.surfaces, streamlit or pandas-based views.
"""

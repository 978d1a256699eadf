"""What people touch: the command line (cli.py), report tables (report.py) and the Streamlit
widgets, state and charts (ui/). app.py and pages/ sit on top of ui/.

May import anything in explorer. Only ui/ (and app.py, pages/) may import streamlit.
"""

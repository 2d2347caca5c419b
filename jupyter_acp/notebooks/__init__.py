"""Notebook tools for agents: an MCP server per session that reads and edits the notebooks of
the workspace cell by cell (live in an open notebook, through jupyter-collaboration's document)
and runs cells in the notebook's kernel after asking the user. See ``channel.py``."""

"""The kernel side of jupyter-acp: ``%acp`` magics, ``ChatPanel``, and their API client.

Imports only the standard library, IPython, ipywidgets/anywidget and ``websockets``: a kernel
need not have the server's dependencies.
"""

"""The live view: everything ``pouta-edge run --http HOST:PORT`` adds.

Rule: a module belongs here when only the HTTP side creates or serves it: the operator
page's sink (``page``), the aiohttp server (``server``), the Prometheus exposition
(``metrics``), the operators' feedback (``feedback``) and the page's ``static/`` files.
"""

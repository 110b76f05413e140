"""``idc-lite serve``: a local HTTP service that photo-editing tools call (the ``serve`` extra).

The model loads once and stays warm; requests that arrive together are described in one batch
(:mod:`~idc_lite.serve.batcher`); the service is safe by default (:mod:`~idc_lite.serve.guard`:
loopback, Host and Origin checks, a token for any other address, capped bodies). Plug-ins talk to
it with :mod:`idc_lite.serve.client`, one file of the standard library they may copy as is.

Importing this package is cheap; FastAPI and uvicorn load in :mod:`~idc_lite.serve.app` and
:mod:`~idc_lite.serve.server`. Details: ``docs/serve.md``.
"""

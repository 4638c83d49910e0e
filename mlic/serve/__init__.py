"""The HTTP service (``mlic serve``): a FastAPI app around a Predictor, with server-side dynamic batching.

``app.py`` holds the routes, limits and errors; ``batcher.py`` the queue that merges concurrent requests
into one forward pass; ``static/`` the web page served at ``/``.
"""

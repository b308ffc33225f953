"""The isolation conformance suite, runnable against any backend.

pytest conformance --bottle-backend=netns        # or docker, smolmachines
pytest --pyargs conformance --bottle-backend=... # from an installed package
"""

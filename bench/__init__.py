"""The benchmark: mmproxy beside go-mmproxy and HAProxy, in network namespaces it makes.

`make bench` (or `python -m bench`) runs it; docs/performance.md says what it measures.
"""

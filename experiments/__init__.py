"""Experiments built on moejax: the router comparison and its report.

`compare_routers` is the CLI; `summary` reads what one run measured from its
workdir; `report` writes the markdown table and `plots` the PNGs.
"""

"""Experiments built on moejax: the router comparison, its tuning sweep, reports.

`compare_routers` and `tune` are the CLIs; `runs` builds, lays out and trains
their runs; `summary` reads what one run measured from its workdir and
`final_state` what its last checkpoint says (router drift, test PPL); `stats`
aggregates seeds and judges orderings; `report` writes the markdown and `plots`
the PNGs.
"""

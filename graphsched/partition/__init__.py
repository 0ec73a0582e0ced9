"""Micro-chunk partitioning: split an all-to-all and the work around it into chunks that overlap.

The solver and plan building live in ``graphsched.schedule``; this package only rewrites graphs.
"""

"""Code generation: graphsched's plans compiled to fused kernels (inductor), emitted in plan order.

``settings.py`` picks the code and holds the compile settings, ``compiler.py`` compiles (as
planned, or the oracle), ``order.py`` is the order pass, ``fusion.py`` the fusion guard and
``snodes.py`` what graphsched reads of inductor's scheduler nodes.
"""

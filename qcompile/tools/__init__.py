"""Offline tools: they write files the package ships and are never imported at run time
(tests/test_import_graph.py checks that nothing in the package imports them).

codebook_optimizer: Lloyd's algorithm for the BOF4 / BOF4-S codebooks; writes
qcompile/data/codebooks.json (``python -m qcompile.tools.codebook_optimizer --write ...``).
"""

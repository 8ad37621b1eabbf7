"""Generated Triton kernels (installed as qcompile.codegen.triton).

emit.py: the registry, element kind -> emitter (elements.py), scale kind -> emitter (scales.py):
the lines each kind's kernels need, their extra operands and launch tensors; lines.py: small
line builders with no format knowledge. The generators and their launchers: dequant.py
(dequantise), quant.py (quantise), linear.py (the fused block-scaled linear, from the jinja2
skeletons in templates/). Nothing is imported here, so that codegen/select.py can ask the
registry without loading the generators.
"""

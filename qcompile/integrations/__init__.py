"""transformers and checkpoint files: hf (BlockQuantConfig and its quantizer), hf_hook (registers
them without importing transformers), stream (quantise a checkpoint tensor by tensor). Nothing
here is imported by the layers below; only hf_hook is imported with ``qcompile`` itself."""

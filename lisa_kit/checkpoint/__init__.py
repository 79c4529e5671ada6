"""Reading and writing weights: released LISA checkpoints, SAM ``.pth`` files, HF dirs,
and lisa_kit's own format. Nothing here unpickles code: safetensors, or
``torch.load(weights_only=True)``; no transformers load runs code shipped with a model
(:mod:`lisa_kit.checkpoint.safe`). Every format loads through :mod:`lisa_kit.checkpoint.io`:
components built without memory, tensors streamed and cast once."""

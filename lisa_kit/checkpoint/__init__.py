"""Reading and writing weights: released LISA checkpoints, SAM ``.pth`` files, HF dirs,
and lisa_kit's own format. Nothing here unpickles code: safetensors, or
``torch.load(weights_only=True)``."""

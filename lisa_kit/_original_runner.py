"""Run the ORIGINAL LISA code (github dvlab-research/LISA) on one image and prompt.

This file is a standalone script for the original's own Python environment (it pins
transformers 4.31, which cannot live beside lisa_kit's transformers 5). It imports only
the original repository, its dependencies and the standard library -- never lisa_kit --
and is started by :mod:`lisa_kit.original` as ``PYTHON _original_runner.py ...``.

It loads a released LISA checkpoint the way the original's ``chat.py`` does, builds
the prompt with the original's conversation template and ``tokenizer_image_token``,
preprocesses the image with the original's CLIP processor and SAM transform, calls the
original ``LISAForCausalLM.evaluate`` (greedy) ``--repeats`` times and writes to
``--out``:

* ``original.json``: ``input_ids`` (the prompt, ``-200`` for the image), ``new_ids``
  (the generated tokens), ``text`` (decoded as ``chat.py`` does), ``seconds`` (one per
  repeat, wall clock of ``evaluate``), ``load_seconds``, ``device``, ``precision``,
  ``versions``;
* ``original_masks.npy``: ``float32 (M, H, W)`` mask logits at the original size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# SAM's pixel statistics (the original's chat.py normalises with these before padding).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lisa-repo", required=True, help="checkout of dvlab-research/LISA (holds model/LISA.py)")
    p.add_argument("--checkpoint", required=True, help="released LISA HF directory (e.g. LISA-7B-v1)")
    p.add_argument("--vision-tower", default=None, help="CLIP tower directory (default: the config's)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--conv-type", default="llava_v1")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--model-max-length", type=int, default=512)
    p.add_argument("--no-mm-start-end", action="store_true", help="the checkpoint was trained without <im_start>")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    repo = Path(a.lisa_repo).resolve()
    if not (repo / "model" / "LISA.py").is_file():
        print(f"error: {repo} is not a LISA checkout (no model/LISA.py)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))

    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessor

    from model.LISA import LISAForCausalLM
    from model.llava import conversation as conversation_lib
    from model.llava.mm_utils import tokenizer_image_token
    from model.segment_anything.utils.transforms import ResizeLongestSide
    from utils.utils import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    device = torch.device(a.device)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.checkpoint, model_max_length=a.model_max_length,
                                              padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
    extra = {"vision_tower": a.vision_tower} if a.vision_tower else {}
    model = LISAForCausalLM.from_pretrained(a.checkpoint, low_cpu_mem_usage=True, seg_token_idx=seg_token_idx,
                                            torch_dtype=dtype, **extra)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.get_model().initialize_vision_modules(model.get_model().config)
    model = model.to(dtype=dtype, device=device)
    model.get_model().get_vision_tower().to(dtype=dtype, device=device)
    model.eval()
    load_seconds = time.perf_counter() - t0

    conv = conversation_lib.conv_templates[a.conv_type].copy()
    conv.messages = []
    text = DEFAULT_IMAGE_TOKEN + "\n" + a.prompt
    if not a.no_mm_start_end:
        text = text.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], "")
    prompt = conv.get_prompt()

    image = cv2.imread(a.image)
    if image is None:
        print(f"error: cannot read image {a.image}", file=sys.stderr)
        return 2
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    original_size = [image.shape[:2]]
    processor = CLIPImageProcessor.from_pretrained(model.config.vision_tower)
    clip = processor.preprocess(image, return_tensors="pt")["pixel_values"].to(device, dtype)
    resized = ResizeLongestSide(a.image_size).apply_image(image)
    resize = [resized.shape[:2]]
    x = torch.from_numpy(resized).permute(2, 0, 1).contiguous().float()
    x = (x - torch.tensor(PIXEL_MEAN).view(-1, 1, 1)) / torch.tensor(PIXEL_STD).view(-1, 1, 1)
    x = F.pad(x, (0, a.image_size - x.shape[-1], 0, a.image_size - x.shape[-2]))
    sam = x.unsqueeze(0).to(device, dtype)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0).to(device)

    seconds, out_ids, masks = [], None, None
    for _ in range(max(1, a.repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out_ids, masks = model.evaluate(clip, sam, input_ids, resize, original_size,
                                        max_new_tokens=a.max_new_tokens, tokenizer=tokenizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t)
    seq = out_ids[0].tolist()
    new_ids = seq[input_ids.shape[1]:]
    shown = out_ids[0][out_ids[0] != IMAGE_TOKEN_INDEX]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "original_masks.npy", masks[0].float().cpu().numpy().astype(np.float32))
    info = {"input_ids": input_ids[0].tolist(), "new_ids": new_ids,
            "text": tokenizer.decode(shown, skip_special_tokens=False), "seconds": seconds,
            "load_seconds": load_seconds, "device": str(device), "precision": a.precision,
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__}, "lisa_repo": str(repo)}
    (out / "original.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

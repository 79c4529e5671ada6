"""Real-size loading leftovers (issue 12): pretrained parts read straight into their final
dtype, frozen training parts loaded in their final dtype, the multi-device plan, and the
thread-safety of building without memory. Tiny configs only; each test takes seconds."""
from __future__ import annotations

import warnings

import pytest
import torch

from lisa_kit.builder import build_model
from lisa_kit.checkpoint.io import cast_component
from lisa_kit.components.hf_causal_lm import TINY_LLAMA
from lisa_kit.testing import tiny_recipe, tiny_tokenizer_dir


@pytest.fixture(scope="module")
def saved_llm(tmp_path_factory):
    """A tiny LLaMA saved by transformers in fp32 (a `pretrained:` directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("llm")
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(out)
    return out


def _pretrained_recipe(path):
    return tiny_recipe(llm={"name": "hf_causal_lm", "pretrained": str(path), "tokenizer": str(tiny_tokenizer_dir())})


def _build(recipe, dtype, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(recipe, dtype=dtype)


def test_pretrained_llm_is_read_straight_into_the_asked_dtype(saved_llm):
    """The LLM's weights come out of the build in bf16 (no fp32 model first), bit-identical
    to the fp32 load cast afterwards -- the rows the added tokens get included."""
    recipe = _pretrained_recipe(saved_llm)
    direct = _build(recipe, torch.bfloat16)
    params = dict(direct.llm.named_parameters())
    assert params and {p.dtype for p in params.values()} == {torch.bfloat16}
    reference = _build(recipe, None)
    cast_component(reference.llm, torch.bfloat16)
    ref = dict(reference.llm.named_parameters())
    assert ref.keys() == params.keys()
    assert direct.llm.vocab_size > TINY_LLAMA["vocab_size"]  # [SEG] and the image tokens were added
    for k, p in params.items():
        assert torch.equal(p, ref[k]), k


def _bf16_run(llm_dir):
    return ["train.precision=bf16", "train.val=null", "train.workers=0", "train.batch_size=2",
            "train.grad_accumulation=1", "train.warmup_steps=1", "data.samples_per_epoch=4",
            "data.sources.synthetic.options.size=8", f"model.llm.pretrained={llm_dir}", "model.llm.config=null"]


def test_training_reads_frozen_pretrained_weights_straight_into_the_training_precision(saved_llm, tmp_path,
                                                                                      monkeypatch):
    """bf16 training: the pretrained LLM's frozen weights are already bf16 when the model is
    built (the old path built fp32 and cast afterwards: the CPU peak was the fp32 model);
    trainable parameters are fp32 masters of the loaded values."""
    from lisa_kit.train import trainable
    from lisa_kit.train.loop import Trainer

    at_cast = []
    cast = trainable.cast_frozen

    def recording_cast(model, dtype):
        at_cast.append({p.dtype for p in model.llm.model.base_model.parameters() if not p.requires_grad})
        return cast(model, dtype)

    monkeypatch.setattr(trainable, "cast_frozen", recording_cast)
    tr = Trainer("lisa-tiny-synthetic", tmp_path / "run", overrides=_bf16_run(saved_llm), progress=False)
    assert at_cast == [{torch.bfloat16}]
    params = dict(tr.model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in tr.trainable_names)
    frozen = [p for n, p in params.items() if n not in tr.trainable_names]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    # The input embeddings train: fp32 masters holding the bf16-loaded values.
    emb = tr.model.llm.model.get_input_embeddings().weight
    assert emb.requires_grad and emb.dtype == torch.float32
    assert torch.equal(emb, emb.to(torch.bfloat16).float())



def test_fingerprint_of_an_fp32_load_rounded_to_bf16_equals_the_bf16_load():
    """A bf16 run fingerprints its frozen weights as loaded (bf16); rebuilding the model in
    fp32 (export, merge) fingerprints the same weights when rounded to the recorded dtype."""
    from lisa_kit.train.checkpointing import frozen_fingerprint

    torch.manual_seed(0)
    fp32 = torch.nn.Linear(64, 32).requires_grad_(False)
    bf16 = torch.nn.Linear(64, 32).requires_grad_(False)
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    assert frozen_fingerprint(fp32) != frozen_fingerprint(bf16)
    assert frozen_fingerprint(fp32, torch.bfloat16) == frozen_fingerprint(bf16)


def test_bf16_run_resumes_and_reloads_for_export(saved_llm, tmp_path):
    """The fingerprint of bf16-loaded frozen weights checks on resume (bf16 again) and when
    the trained model is rebuilt in fp32 (export's load_trained_model)."""
    from lisa_kit.train.checkpointing import load_trained_model
    from lisa_kit.train.loop import Trainer

    ov = _bf16_run(saved_llm) + ["train.steps=2", "train.save_every=1"]
    Trainer("lisa-tiny-synthetic", tmp_path / "run", overrides=ov, stop_after=1, progress=False).fit()
    assert Trainer(None, tmp_path / "run", resume=tmp_path / "run", progress=False).fit()["step"] == 2
    model = load_trained_model(tmp_path / "run")
    assert model.llm.model.get_input_embeddings().weight.dtype == torch.float32


# -- 3. device map -------------------------------------------------------------------------
GB = 10 ** 9


def test_plan_fills_devices_in_order_and_balanced_evens_them():
    from lisa_kit.checkpoint.device_map import plan_layers

    layers = [2 * GB] * 10
    caps = [("cuda:0", 12 * GB), ("cuda:1", 40 * GB)]
    auto = plan_layers(4 * GB, layers, caps, "auto")
    assert auto == ["cuda:0"] * 4 + ["cuda:1"] * 6  # 4 + 4 x 2 = 12 GB on the first
    balanced = plan_layers(4 * GB, layers, caps, "balanced")
    assert balanced == ["cuda:0"] * 4 + ["cuda:1"] * 6  # the first is full before its share (12 GB)
    even = plan_layers(4 * GB, layers, [("cuda:0", 40 * GB), ("cuda:1", 40 * GB)], "balanced")
    assert even == ["cuda:0"] * 4 + ["cuda:1"] * 6  # 12 GB each
    assert plan_layers(4 * GB, layers, [("cuda:0", 40 * GB), ("cuda:1", 40 * GB)], "auto") == ["cuda:0"] * 10
    three = plan_layers(0, [GB] * 9, [(f"cuda:{i}", 10 * GB) for i in range(3)], "balanced")
    assert [three.count(f"cuda:{i}") for i in range(3)] == [3, 3, 3]


def test_plan_that_cannot_fit_names_what_does_not():
    from lisa_kit.checkpoint.device_map import plan_layers
    from lisa_kit.errors import InsufficientMemoryError

    with pytest.raises(InsufficientMemoryError, match="first device.*cuda:0"):
        plan_layers(20 * GB, [GB], [("cuda:0", 16 * GB), ("cuda:1", 80 * GB)])
    with pytest.raises(InsufficientMemoryError, match="10 decoder layers.*cuda:0, cuda:1"):
        plan_layers(4 * GB, [3 * GB] * 10, [("cuda:0", 16 * GB), ("cuda:1", 16 * GB)], "balanced")


@pytest.mark.parametrize("bad", ["nonsense", "{\"cuda:0\": \"lots\"}", "{}", "{\"nodevice\": 1}", "[1, 2]"])
def test_bad_device_map_is_an_input_error(bad):
    from lisa_kit.checkpoint.device_map import parse_device_map
    from lisa_kit.errors import InputError

    with pytest.raises(InputError):
        parse_device_map(bad)


def test_device_map_capacities_parse_units():
    from lisa_kit.checkpoint.device_map import parse_device_map

    assert parse_device_map('{"cuda:0": "1.5GiB", "cuda:1": "500MB", "cpu": 1024}') == \
        {"cuda:0": int(1.5 * 2 ** 30), "cuda:1": 500 * 10 ** 6, "cpu": 1024}
    assert parse_device_map("balanced") == "balanced"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The tiny model in lisa_kit's format and in LISA's released one."""
    from lisa_kit.checkpoint.export import export_lisa_hf
    from lisa_kit.checkpoint.native import save_model

    out = tmp_path_factory.mktemp("tiny")
    model = _build(tiny_recipe(), None)
    save_model(model, out / "native")
    with warnings.catch_warnings():  # the export's notes on what LISA's format cannot hold
        warnings.simplefilter("ignore")
        export_lisa_hf(model, out / "lisa_hf")
    return out


def _lisa_hf_kwargs(root):
    return {"vision_tower": str(root / "lisa_hf" / "clip_vision_tower"), "sam": str(root / "lisa_hf" / "sam_config.json")}


@pytest.mark.parametrize("fmt", ["native", "lisa_hf"])
def test_device_map_load_answers_as_the_plain_load(saved_tiny, fmt, monkeypatch):
    """On CPU the map can only name the CPU: the plan, the per-tensor placement and the
    dispatch run, and the answers equal the plain load's (multi-GPU: docs/architecture.md)."""
    from lisa_kit.api import Segmenter
    from lisa_kit.testing import force_generation, synthetic_image

    kw = _lisa_hf_kwargs(saved_tiny) if fmt == "lisa_hf" else {}
    plain = Segmenter.from_checkpoint(saved_tiny / fmt, precision="bf16", **kw)
    mapped = Segmenter.from_checkpoint(saved_tiny / fmt, precision="bf16", device_map='{"cpu": "8GiB"}', **kw)
    assert mapped.device == torch.device("cpu")
    assert mapped.model.llm.model.hf_device_map  # dispatched by accelerate
    a, b = plain.model.state_dict(), mapped.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    img, _ = synthetic_image(40, 48, 0)
    force_generation(monkeypatch, {1: plain.model.seg_token_id, 2: plain.tokenizer.eos_id})
    r1, r2 = plain.seg(img, "Segment the red circle."), mapped.seg(img, "Segment the red circle.")
    assert r1.num_masks == r2.num_masks == 1 and r1.scores == r2.scores and (r1.masks == r2.masks).all()


@pytest.mark.parametrize("fmt", ["native", "lisa_hf"])
def test_recipe_with_weights_loads_through_a_device_map(saved_tiny, fmt):
    """``Segmenter.from_recipe(..., device_map=...)`` plans and places as ``from_checkpoint``
    does, for a recipe whose ``weights:`` name the checkpoint."""
    from lisa_kit.api import Segmenter
    from lisa_kit.checkpoint.lisa_hf import lisa_recipe
    from lisa_kit.errors import InputError, InsufficientMemoryError

    if fmt == "lisa_hf":
        kw = _lisa_hf_kwargs(saved_tiny)
        recipe = lisa_recipe(saved_tiny / fmt, vision_tower=kw["vision_tower"], sam=kw["sam"])
    else:
        recipe = {"name": "native", "weights": {"format": "lisa_kit", "path": str(saved_tiny / fmt)}}
    plain = Segmenter.from_checkpoint(saved_tiny / fmt, precision="bf16", **(kw if fmt == "lisa_hf" else {}))
    mapped = Segmenter.from_recipe(recipe, precision="bf16", device_map={"cpu": "8GiB"})
    assert mapped.model.llm.model.hf_device_map and mapped.device == torch.device("cpu")
    a, b = plain.model.state_dict(), mapped.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with pytest.raises(InsufficientMemoryError, match="first device \\(cpu"):
        Segmenter.from_recipe(recipe, device_map={"cpu": "1KiB"})
    with pytest.raises(InputError, match="weights.format"):  # random weights: nothing to place
        Segmenter.from_recipe("lisa-tiny", device_map="auto")


@pytest.mark.parametrize("fmt", ["native", "lisa_hf"])
def test_device_map_too_small_is_refused_before_reading_a_weight(saved_tiny, fmt, monkeypatch):
    from lisa_kit.api import Segmenter
    from lisa_kit.checkpoint import io
    from lisa_kit.errors import InsufficientMemoryError

    def no_reads(*a, **k):
        raise AssertionError("a weight was read before the plan")

    monkeypatch.setattr(io, "_file_tensors", no_reads)
    kw = _lisa_hf_kwargs(saved_tiny) if fmt == "lisa_hf" else {}
    with pytest.raises(InsufficientMemoryError, match="first device \\(cpu"):
        Segmenter.from_checkpoint(saved_tiny / fmt, device_map={"cpu": "1KiB"}, **kw)


def test_cli_device_map_errors_are_one_line(saved_tiny, tmp_path, capsys):
    from PIL import Image

    from lisa_kit.cli import main
    from lisa_kit.testing import synthetic_image

    img = tmp_path / "a.png"
    Image.fromarray(synthetic_image(32, 32, 0)[0]).save(img)
    common = ["--image", str(img), "--prompt", "Segment it.", "--out", str(tmp_path / "o")]
    assert main(["segment", "--recipe", "lisa-tiny", "--device-map", "auto", *common]) == 2
    assert "weights.format is lisa_hf or lisa_kit" in capsys.readouterr().err  # random weights: nothing to place
    rc = main(["segment", "--checkpoint", str(saved_tiny / "native"), "--device-map", '{"cpu": "1KiB"}', *common])
    err = capsys.readouterr().err
    assert rc != 0 and "first device (cpu" in err and "Traceback" not in err


# -- 4. environment values written back by structure -----------------------------------------
def test_a_literal_equal_to_an_environment_value_is_written_as_it_is(tmp_path, monkeypatch):
    """Only nodes that interpolate the environment (directly, embedded, or through a node
    interpolation) are written back as ${oc.env:...}; a literal with the same text stays."""
    import yaml

    from lisa_kit.builder import load
    from lisa_kit.checkpoint.native import save_model
    from lisa_kit.recipes import load_recipe, load_yaml_safely, persisted_yaml

    monkeypatch.setenv("LISA_KIT_TEST_VALUE", "shared-text-value")
    recipe = tiny_recipe()
    recipe["description"] = "${oc.env:LISA_KIT_TEST_VALUE}"
    recipe["eval"] = {"literal": "shared-text-value", "embedded": "in ${oc.env:LISA_KIT_TEST_VALUE} text",
                      "copied": "${description}", "literal_inside": "a shared-text-value here"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    persisted = yaml.safe_load(persisted_yaml(load_recipe(str(path))))
    expected = {"literal": "shared-text-value", "embedded": "in ${oc.env:LISA_KIT_TEST_VALUE} text",
                "copied": "${description}", "literal_inside": "a shared-text-value here"}
    assert persisted["description"] == "${oc.env:LISA_KIT_TEST_VALUE}"
    assert persisted["eval"] == expected
    save_model(load(str(path)), tmp_path / "ckpt")
    saved = load_yaml_safely(tmp_path / "ckpt" / "recipe.yaml")
    assert saved["description"] == "${oc.env:LISA_KIT_TEST_VALUE}" and saved["eval"] == expected


# -- 5. building without memory from several threads ------------------------------------------
def test_empty_weights_affects_only_its_own_thread_and_restores_once():
    import threading

    from lisa_kit.checkpoint import io

    original = torch.nn.Module.register_parameter
    inside, built, done = threading.Event(), threading.Event(), threading.Event()
    out = {}

    def empty_builder(name, wait_for):
        with io.empty_weights():
            inside.set()
            wait_for.wait(10)
            out[name] = torch.nn.Linear(3, 4)
        done.set()

    def plain_builder():
        inside.wait(10)
        out["plain"] = torch.nn.Linear(3, 4)  # built while the other thread is inside
        built.set()

    threads = [threading.Thread(target=empty_builder, args=("empty", built)), threading.Thread(target=plain_builder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out["empty"].weight.is_meta and not out["plain"].weight.is_meta
    assert torch.nn.Module.register_parameter is original

    # Two threads inside at once, leaving in the order they did not enter: both build empty,
    # and the original registration is back afterwards (not the patch one of them saw).
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with io.empty_weights():
            first_in.set()
            second_in.wait(10)
            out["first"] = torch.nn.Linear(3, 4)
        first_out.set()

    def second():
        first_in.wait(10)
        with io.empty_weights():
            second_in.set()
            first_out.wait(10)  # the first thread has left: this one is still inside
            out["second"] = torch.nn.Linear(3, 4)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out["first"].weight.is_meta and out["second"].weight.is_meta
    assert torch.nn.Module.register_parameter is original
    assert not torch.nn.Linear(3, 4).weight.is_meta


# -- 6. one header reader ------------------------------------------------------------------------
def test_stored_dtype_reads_files_as_the_loader_does(tmp_path):
    """A SAM-style ``{"state_dict": ...}`` pickle: the loader unwraps it, and so does the
    export's dtype check (it saw no tensors there before); unreadable files give ``None``."""
    from lisa_kit.checkpoint import io
    from lisa_kit.checkpoint.export import stored_dtype

    torch.save({"state_dict": {"w": torch.ones(2, 2, dtype=torch.bfloat16), "n": torch.ones(2, dtype=torch.int64)}},
               tmp_path / "sam.pth")
    assert [dt for _, _, dt in io.header_entries(tmp_path / "sam.pth")] == [torch.bfloat16, torch.int64]
    assert stored_dtype(tmp_path / "sam.pth") == torch.bfloat16
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    assert stored_dtype(tmp_path) is None


# -- 7. a rank failing outside I/O leaves no rank waiting ---------------------------------------
_RANK_FAILURES = '''
import json, sys
from pathlib import Path
from lisa_kit.evaluate import Evaluator
from lisa_kit.train import loop
from lisa_kit.train.distributed import cleanup, init_distributed

env = init_distributed("ddp", "cpu")
out = {}
loop.full_state = lambda model, names, env: {}
loop.optimizer_state = lambda model, optimizer, env: {}
tr = loop.Trainer.__new__(loop.Trainer)
tr.env, tr.model, tr.trainable_names, tr.optimizer, tr.step = env, None, [], None, 3
tr.ckpt_root = Path(sys.argv[1])

def write(*a):  # rank 0 fails while writing, not with an OSError
    raise ValueError("cannot serialise")

tr._write = write
for name, call in [("save", tr.save)]:
    try:
        call()
    except Exception as e:
        out[name] = [type(e).__name__, getattr(e, "ranks", None)]
ev = Evaluator.__new__(Evaluator)
ev.modes = ["teacher"]

def collect(rank, world):  # rank 1 fails while scoring
    if rank == 1:
        raise RuntimeError("out of memory")
    ev._verdicts = {}
    return {"teacher": {}}

ev.collect = collect
try:
    ev.run()
except Exception as e:
    out["eval"] = [type(e).__name__, getattr(e, "ranks", None)]
Path(sys.argv[1], f"rank{env.rank}.json").write_text(json.dumps(out))
cleanup()
'''


def test_a_rank_failing_in_save_or_eval_makes_every_rank_raise_typed(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "fail.py"
    script.write_text(_RANK_FAILURES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a rank left waiting in a collective: the failure this test is about
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a rank was left waiting in a collective")
    assert proc.returncode == 0, err[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == {"save": ["TrainingError", None], "eval": ["RankFailedError", [1]]}
    assert got[1] == {"save": ["RankFailedError", [0]], "eval": ["EvaluationError", None]}


# -- 8. a stopped run ends with its own exit code ------------------------------------------------
def test_signals_after_a_stop_are_ignored_and_before_it_keep_their_effect(monkeypatch):
    import os
    import signal

    from lisa_kit.train import signals

    seen = []
    monkeypatch.setattr(signals, "_stopped_by", None)
    previous = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in signals.HANDLED}
    try:
        signals.ignore_signals_after_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # no run stopped yet: the handler in place is called
        assert seen == [signal.SIGTERM]
        with signals.StopSignals(lambda text: None) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # after the stop: ignored, the process ends with 143
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGTERM]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- 1b. other pretrained towers read into their dtype ---------------------------------------------
def _tiny_timm_file(tmp_path):
    import timm

    from lisa_kit.checkpoint.io import save_safetensors
    from lisa_kit.components.timm_tower import TINY_TIMM_VIT

    torch.manual_seed(0)
    src = timm.create_model(TINY_TIMM_VIT["model_name"], pretrained=False, num_classes=0,
                            **TINY_TIMM_VIT["model_kwargs"])
    save_safetensors(src.state_dict(), tmp_path / "timm.safetensors")
    return dict(TINY_TIMM_VIT), str(tmp_path / "timm.safetensors")


def _tiny_open_clip_file(tmp_path):
    from lisa_kit.checkpoint.io import save_safetensors
    from lisa_kit.components.open_clip_tower import TINY_OPEN_CLIP, build_open_clip

    torch.manual_seed(0)
    src = build_open_clip(config=TINY_OPEN_CLIP)
    save_safetensors({f"visual.{k}": v for k, v in src.visual.state_dict().items()}, tmp_path / "oc.safetensors")
    return {"config": TINY_OPEN_CLIP}, str(tmp_path / "oc.safetensors")


@pytest.mark.parametrize("name,make", [("timm", _tiny_timm_file), ("open_clip", _tiny_open_clip_file)])
def test_pretrained_towers_are_read_straight_into_the_asked_dtype(tmp_path, name, make):
    """timm / open_clip towers with a weights file: built without memory, each tensor cast
    once to the build's dtype (before: a random fp32 tower, the file in fp32, then a cast)."""
    from lisa_kit.builder import build_component

    node, f = make(tmp_path)
    direct = build_component("vision_encoder", {"name": name, **node, "pretrained": f}, dtype=torch.bfloat16)
    ref = build_component("vision_encoder", {"name": name, **node, "pretrained": f})
    cast_component(ref, torch.bfloat16)
    a, b = dict(direct.named_parameters()), dict(ref.named_parameters())
    assert a and {p.dtype for p in a.values()} == {torch.bfloat16}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_an_older_version_resumes_the_way_it_was_built(saved_llm, tmp_path):
    """Before this version a bf16 run fingerprinted its frozen weights in fp32 (loaded fp32,
    then cast) and recorded no fingerprint dtype: such a checkpoint resumes through that path."""
    import json

    from lisa_kit.train import checkpointing as ckpt
    from lisa_kit.train.loop import Trainer

    ov = _bf16_run(saved_llm) + ["train.steps=2", "train.save_every=1"]
    Trainer("lisa-tiny-synthetic", tmp_path / "run", overrides=ov, stop_after=1, progress=False).fit()
    old_style = Trainer("lisa-tiny-synthetic", tmp_path / "fp32", progress=False,
                        overrides=ov + ["train.precision=fp32"]).fingerprint  # the fp32 values of the same weights
    step = tmp_path / "run" / "checkpoints" / ckpt.step_name(1)
    meta = json.loads((step / ckpt.META_FILE).read_text())
    assert meta.pop(ckpt.FINGERPRINT_DTYPE) == "bf16"
    meta["frozen_fingerprint"] = old_style
    (step / ckpt.META_FILE).write_text(json.dumps(meta, indent=1))
    manifest = json.loads((step / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][ckpt.META_FILE] = ckpt._seal(step / ckpt.META_FILE)
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    resumed = Trainer(None, tmp_path / "run", resume=tmp_path / "run", progress=False)
    frozen = [p for n, p in resumed.model.named_parameters() if n not in resumed.trainable_names]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert resumed.fit()["step"] == 2

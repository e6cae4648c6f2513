"""The trainer: what it optimises, over which tokens, and what it saves."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.listing import all_files
from tokenclean.data import parse_record
from tokenclean.loss import token_losses
from tokenclean.tokenization import tokenize_records
from tokenclean.training import TrainConfig, lr_factor, step_schedule, train_model

TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox"), ("Reverse the letters : c a t", "t a c"),
         ("x y z", "Hope this helps ."), ("what", "the lazy dog jumps")]


@pytest.fixture(scope="module")
def table(tok):
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}") for i, (p, c) in enumerate(TEXTS)]
    return tokenize_records(recs, tok, 64)[0]


@pytest.fixture()
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def half_mask(table):
    rng = np.random.default_rng(0)
    return table.loss_mask & (rng.random(table.n_tokens) < 0.5)


def weights_of(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def update_with(model_dir, table, tok, **settings) -> torch.Tensor:
    """The weights after two steps from the tiny model on half the response tokens, with ``settings`` changed:
    settings that must not change the arithmetic are compared through it."""
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = TrainConfig(**{"steps": 2, "batch_size": 6, "lr": 1e-2, "warmup_ratio": 0, "seed": 3, **settings})
    train_model(m, table, half_mask(table), cfg, tok.pad_token_id, progress=False)
    return weights_of(m)


def test_step_loss_is_mean_over_selected_tokens_of_the_whole_step(model, table, tok, tmp_path):
    mask = half_mask(table)
    cfg = TrainConfig(steps=1, batch_size=6, micro_batch_size=2, lr=1e-9, warmup_ratio=0, shuffle=False)
    before = token_losses(copy.deepcopy(model), table, pad_id=tok.pad_token_id, progress=False)
    usable = [i for i in range(table.n_samples) if mask[table.offsets[i]:table.offsets[i + 1]].any()]
    expected = float(np.mean(np.concatenate([before[table.offsets[i]:table.offsets[i + 1]][
        mask[table.offsets[i]:table.offsets[i + 1]]] for i in usable])))
    log = tmp_path / "log.jsonl"
    train_model(model, table, mask, cfg, tok.pad_token_id, log_path=log, progress=False)
    logged = json.loads(log.read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(expected, abs=1e-5)
    assert logged["selected_tokens"] == int(mask.sum())


def test_gradient_accumulation_gives_the_same_update(tiny_model_dir, table, tok):
    results = [update_with(tiny_model_dir, table, tok, micro_batch_size=micro, max_grad_norm=0) for micro in (1, 3, 6)]
    # Adam amplifies float noise of near-zero gradients a little (1.5e-4 at the portable kernel pin's SSE2 GEMMs);
    # a wrong normalisation moves weights by ~lr
    assert torch.allclose(results[0], results[1], atol=5e-4) and torch.allclose(results[0], results[2], atol=5e-4)


def test_samples_without_selected_tokens_are_skipped_without_nan(model, table, tok):
    mask = table.loss_mask.copy()
    mask[table.offsets[1]:table.offsets[3]] = False  # samples 1 and 2 keep nothing
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3)
    _, summary = train_model(model, table, mask, cfg, tok.pad_token_id, progress=False)
    assert summary["samples_without_selected_tokens"] == 2 and summary["samples_used"] == 4
    assert np.isfinite(summary["final_loss"])
    with pytest.raises(ValueError, match="no token"):
        train_model(model, table, np.zeros_like(mask), cfg, tok.pad_token_id, progress=False)


@pytest.mark.slow  # trains for real: ~6 s
def test_training_lowers_the_loss_of_selected_tokens_only(model, table, tok):
    mask = half_mask(table)
    before = token_losses(copy.deepcopy(model), table, pad_id=tok.pad_token_id, progress=False)
    model, _ = train_model(model, table, mask, TrainConfig(steps=30, batch_size=6, lr=3e-3), tok.pad_token_id,
                           progress=False)
    after = token_losses(model, table, pad_id=tok.pad_token_id, progress=False)
    assert np.mean(after[mask]) < np.mean(before[mask]) - 0.5


def test_seeded_order_and_schedule():
    cfg = TrainConfig(steps=5, batch_size=4, seed=7)
    a, b = step_schedule(10, cfg), step_schedule(10, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 5
    c = step_schedule(10, TrainConfig(steps=5, batch_size=4, seed=8))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # every sample is seen once per epoch
    flat = np.concatenate(a)[:10]
    assert sorted(flat.tolist()) == list(range(10))
    ordered = step_schedule(10, TrainConfig(steps=0, epochs=1, batch_size=4, shuffle=False))
    assert np.concatenate(ordered).tolist() == list(range(10)) and len(ordered) == 3
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1) and lr_factor(99, 100, 10, "linear") < 0.02


def test_train_cli_saves_plain_hf_directory_with_lora_merged(tmp_path, tiny_model_dir, tiny_tokenizer_dir):
    from tokenclean.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    out = tmp_path / "model"
    beside = all_files(tmp_path)
    assert main(["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files and "train_log.jsonl" in files
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert set(dict(reloaded.named_parameters())) == set(dict(base.named_parameters()))
    changed = any(not torch.equal(a, b) for a, b in zip(reloaded.parameters(), base.parameters()))
    assert changed
    # beside the model nothing new (no temporary directory, no checkpoint), inside it nothing hidden
    assert [f for f in all_files(tmp_path) if not f.startswith("model/")] == sorted(beside + ["model"])
    assert not [f for f in all_files(out) if any(part.startswith(".") for part in f.split("/"))]


def test_packed_rows_hold_every_sample_once_with_restarting_positions(table):
    from tokenclean.batching import pack

    samples = np.arange(table.n_samples)
    width = int(table.lengths.max()) - 1  # the longest sample cannot share a row, nor fit: it gets its own
    batch = pack(table, samples, width, pad_id=0)
    index, pos = batch["index"].numpy(), batch["position_ids"].numpy()
    assert sorted(index[index >= 0].tolist()) == list(range(table.n_tokens))
    for s in samples:
        cells = np.argwhere(np.isin(index, np.arange(table.offsets[s], table.offsets[s + 1])))
        assert len(set(cells[:, 0])) == 1, "a sample is split across rows"
        row, cols = cells[0, 0], cells[:, 1]
        assert pos[row, cols].tolist() == list(range(table.lengths[s]))
        sample = table.input_ids[table.offsets[s]:table.offsets[s + 1]]
        assert batch["input_ids"].numpy()[row, cols].tolist() == sample.tolist()
    assert batch["target"].numpy()[index >= 0].sum() == table.loss_mask.sum()


def test_packing_gives_the_same_update_as_padding(tiny_model_dir, table, tok):
    weights = [update_with(tiny_model_dir, table, tok, pack_length=pack_length, max_grad_norm=0)
               for pack_length in (0, 12, 64)]  # 12: rows shorter than some samples
    assert torch.allclose(weights[0], weights[1], atol=1e-4) and torch.allclose(weights[0], weights[2], atol=1e-4)


def test_packing_refuses_a_model_that_lets_samples_see_each_other(model, table, tok, monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # plain causal mask
    cfg = TrainConfig(steps=1, batch_size=6, pack_length=64)
    with pytest.raises(ValueError, match="pack_length: 0"):
        train_model(model, table, table.loss_mask.copy(), cfg, tok.pad_token_id, progress=False)


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(tiny_model_dir, table, tok,
                                                                                  tmp_path):
    from tokenclean.training import TrainingInterrupted

    mask = half_mask(table)
    cfg = TrainConfig(steps=6, batch_size=3, lr=1e-2, warmup_ratio=0.2, seed=5, checkpoint_every=2)
    straight, _ = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, mask, cfg,
                              tok.pad_token_id, progress=False, checkpoint_dir=tmp_path / "a")
    with pytest.raises(TrainingInterrupted):  # killed after step 3: its last checkpoint is from step 2
        train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, mask, cfg, tok.pad_token_id,
                    progress=False, checkpoint_dir=tmp_path / "b", stop_after=3)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    resumed, summary = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, mask, cfg,
                                   tok.pad_token_id, progress=False, checkpoint_dir=tmp_path / "b")
    assert torch.allclose(weights_of(straight), weights_of(resumed), atol=1e-6)
    assert summary["selected_tokens_trained"] == _["selected_tokens_trained"]


def test_a_checkpoint_of_another_run_is_not_resumed(tiny_model_dir, table, tok, tmp_path):
    from tokenclean.training import TrainingInterrupted

    mask = half_mask(table)
    cfg = TrainConfig(steps=4, batch_size=3, lr=1e-2, seed=5, checkpoint_every=1)
    with pytest.raises(TrainingInterrupted):
        train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, mask, cfg, tok.pad_token_id,
                    progress=False, checkpoint_dir=tmp_path / "c", stop_after=2)
    other = TrainConfig(steps=4, batch_size=3, lr=2e-2, seed=5, checkpoint_every=1)  # another learning rate
    fresh, _ = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, mask, other,
                           tok.pad_token_id, progress=False, checkpoint_dir=tmp_path / "d")
    reused, _ = train_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, mask, other,
                            tok.pad_token_id, progress=False, checkpoint_dir=tmp_path / "c")
    assert torch.allclose(weights_of(fresh), weights_of(reused), atol=1e-6)


def test_micro_batch_normalisation_is_the_mean_of_micro_batch_means(model, table, tok, tmp_path):
    mask = half_mask(table)
    cfg = TrainConfig(steps=1, batch_size=6, micro_batch_size=2, lr=1e-9, warmup_ratio=0, shuffle=False,
                      loss_normalization="micro_batch")
    before = token_losses(copy.deepcopy(model), table, pad_id=tok.pad_token_id, progress=False)
    usable = [i for i in range(table.n_samples) if mask[table.offsets[i]:table.offsets[i + 1]].any()]
    per_micro = []
    for j in range(0, len(usable), 2):
        picked = np.concatenate([np.flatnonzero(mask[table.offsets[i]:table.offsets[i + 1]]) + table.offsets[i]
                                 for i in usable[j:j + 2]])
        per_micro.append(before[picked].mean())
    log = tmp_path / "log.jsonl"
    train_model(model, table, mask, cfg, tok.pad_token_id, log_path=log, progress=False)
    logged = json.loads(log.read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(float(np.mean(per_micro)), abs=1e-5)


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, table, tok):
    results = [update_with(tiny_model_dir, table, tok, gradient_checkpointing=on) for on in (False, True)]
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_lora_merge_gives_the_adapter_models_outputs(tiny_model_dir, table, tok):
    from tokenclean.training import _wrap_lora

    cfg = TrainConfig(steps=3, batch_size=3, lr=5e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=1)
    adapted, _ = _wrap_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    with torch.no_grad():  # give the adapters non-zero weights, as training would
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapted.eval()
    ids = torch.from_numpy(table.input_ids[table.offsets[0]:table.offsets[1]].astype(np.int64))[None]
    with torch.no_grad():
        before = adapted(input_ids=ids).logits
        merged = adapted.merge_and_unload()
        after = merged(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(before, after, atol=1e-5)


def test_packed_and_padded_batches_give_every_token_the_same_loss(model, table, tok):
    from tokenclean.batching import collate, pack
    from tokenclean.loss import target_nll

    samples = np.arange(table.n_samples)
    model.eval()
    with torch.no_grad():
        packed = pack(table, samples, 20, tok.pad_token_id)
        got = target_nll(model, packed["input_ids"], None, packed["target"], position_ids=packed["position_ids"])
        padded = collate(table, samples, tok.pad_token_id)
        want = target_nll(model, padded["input_ids"], padded["attention_mask"], padded["target"])
    by_token = dict(zip(packed["index"][packed["target"]].tolist(), got.tolist()))
    expected = dict(zip(np.flatnonzero(table.loss_mask).tolist(), want.tolist()))  # collate: table order
    assert by_token.keys() == expected.keys()
    assert max(abs(by_token[k] - expected[k]) for k in expected) < 1e-5


@pytest.mark.slow  # two training processes, one killed: ~9 s
def test_train_cli_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from tokenclean.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    flags = ["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--steps", "300", "--batch-size",
             "4", "--lr", "0.01", "--seed", "4", "--checkpoint-every", "20", "--threads", "1"]
    assert main([*flags, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tokenclean.cli", *flags, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed.resume" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not state.exists():
        pytest.skip("the run ended before its first checkpoint could be interrupted")
    assert not out.exists()  # nothing half-written where the model belongs
    assert main([*flags, "--out", str(out)]) == 0
    assert not (tmp_path / "killed.resume").exists()  # cleaned up once the model is saved
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # one log entry per logged step, to the end


def test_the_optimizer_gets_the_configured_betas_and_epsilon(model, table, tok, monkeypatch):
    import tokenclean.training as training

    seen = []
    defaults = torch.optim.AdamW([torch.zeros(1)]).defaults  # the official runs: torch's AdamW defaults

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(training.torch.optim, "AdamW", Recording)
    train_model(model, table, table.loss_mask.copy(), TrainConfig(steps=1, batch_size=2), tok.pad_token_id,
                progress=False)
    assert seen[-1]["betas"] == defaults["betas"] == (0.9, 0.999) and seen[-1]["eps"] == defaults["eps"]
    cfg = TrainConfig(steps=1, batch_size=2, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    train_model(model, table, table.loss_mask.copy(), cfg, tok.pad_token_id, progress=False)
    assert seen[-1]["betas"] == (0.8, 0.95) and seen[-1]["eps"] == 1e-6


def test_the_embedded_configs_keep_the_beta2_they_were_calibrated_with():
    import yaml

    from tokenclean.cli import build_parser

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    for name in ("config.yaml", "configs/smoke.yaml"):
        config = yaml.safe_load((root / name).read_text())
        for section in (config["base_model"]["pretrain"], config["warmup"], config["sft"]):
            assert section["train"]["adam_beta2"] == 0.95, name
    args = build_parser().parse_args(["train", "--model", "m", "--tokens", "t", "--out", "o", "--adam-beta2", "0.95"])
    assert args.adam_beta2 == 0.95


def test_micro_batches_are_consecutive_slices_shared_by_every_process_count():
    from tokenclean.training import micro_batches

    samples = np.array([7, 3, 9, 1, 4])
    cfg = TrainConfig(steps=1, batch_size=5, micro_batch_size=2, loss_normalization="micro_batch")
    want = [[7, 3], [9, 1], [4]]
    for world in (1, 2, 3, 8):
        assert [c.tolist() for c in micro_batches(samples, cfg, world)] == want
    # micro_batch_size 0: one micro-batch under micro_batch normalisation (its meaning), a slice per process
    # under step normalisation (where the split changes nothing but memory)
    whole = TrainConfig(steps=1, batch_size=5, loss_normalization="micro_batch")
    assert [c.tolist() for c in micro_batches(samples, whole, 2)] == [[7, 3, 9, 1, 4]]
    step = TrainConfig(steps=1, batch_size=5)
    assert [c.tolist() for c in micro_batches(samples, step, 2)] == [[7, 3, 9], [1, 4]]
    assert [c.tolist() for c in micro_batches(samples, step, 1)] == [[7, 3, 9, 1, 4]]


def test_lora_is_merged_into_float32_starting_weights_and_saved_in_float32(tmp_path, tiny_model_dir, monkeypatch):
    """Trained in bf16, merged as the official script did: W + (alpha / r) B A in float32 over the float32
    starting weights read from disk, saved in float32 (nothing rounded to bf16)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    import tokenclean.training as training
    from tokenclean.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    adapter = {}
    real_merge = training.merge_adapter

    def spy(model, *args, **kwargs):  # the trained adapter, as it is when merged
        adapter.update({k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()})
        return real_merge(model, *args, **kwargs)

    monkeypatch.setattr(training, "merge_adapter", spy)
    out = tmp_path / "model"
    assert main(["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--out", str(out), "--steps", "3",
                 "--batch-size", "3", "--lr", "0.05", "--dtype", "bfloat16", "--lora-r", "4", "--lora-alpha", "8",
                 "--lora-dropout", "0", "--lora-targets", "q_proj,v_proj,down_proj"]) == 0
    saved = load_file(str(out / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))  # float32
    assert saved.keys() == start.keys() and all(v.dtype == torch.float32 for v in saved.values())
    merged = 0
    for name, weight in start.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in adapter:
            a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
            expected = weight + (8 / 4) * (b @ a)
            merged += 1
        else:
            expected = weight
        assert torch.allclose(saved[name], expected, rtol=0, atol=1e-6), name
    assert merged == 2 * 3  # q, v and down projections of both layers
    assert any((saved[n] - start[n]).abs().max() > 1e-4 for n in start)  # the adapter did train
    meta = json.loads((out / "tokenclean.json").read_text())
    assert meta["saved_dtype"] == "float32" and meta["train_config"]["merge_dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # stock loaders see float32 too


def test_merge_dtype_auto_keeps_the_training_dtype(tiny_model_dir, table, tok):
    results = {}
    for merge_dtype in ("auto", "float32"):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        cfg = TrainConfig(steps=1, batch_size=3, lora_r=2, lora_alpha=4, merge_dtype=merge_dtype)
        merged, _ = train_model(m, table, table.loss_mask.copy(), cfg, tok.pad_token_id, progress=False)
        results[merge_dtype] = {p.dtype for p in merged.parameters()}
        assert not any("lora" in n for n, _ in merged.named_parameters())
    assert results == {"auto": {torch.bfloat16}, "float32": {torch.float32}}
    with pytest.raises(ValueError, match="merge_dtype"):
        TrainConfig(merge_dtype="float16")


@pytest.mark.parametrize("pack_length,lora_r,checkpointing", [(0, 0, False), (64, 4, True)])
def test_the_chunked_loss_gives_the_same_update(tiny_model_dir, table, tok, monkeypatch, pack_length, lora_r,
                                                 checkpointing):
    """The trainer's loss in chunks of 3 target rows (the head recomputed in backward, beside the decoder's own
    gradient checkpointing and LoRA) trains to the weights of the loss over the whole micro-batch at once."""
    import tokenclean.loss

    mask = half_mask(table)
    cfg = TrainConfig(steps=2, batch_size=6, pack_length=pack_length, lr=1e-2, warmup_ratio=0, seed=3,
                      lora_r=lora_r, gradient_checkpointing=checkpointing, merge_dtype="float32")
    results, rows = [], []
    for chunk_rows in (None, 3):
        if chunk_rows:
            monkeypatch.setattr(tokenclean.loss, "head_chunk_rows", lambda vocab, device, rows=chunk_rows: rows)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        handle = m.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(len(args[0])))
        trained, _ = train_model(m, table, mask, cfg, tok.pad_token_id, progress=False)
        handle.remove()
        results.append(weights_of(trained))
        if chunk_rows:
            assert max(rows) == 3  # the head never saw more than a chunk
        rows.clear()
    # Adam divides each gradient by its own running scale, so the chunked head's other summation order moves a
    # weight by a few 1e-5 after two steps at lr 1e-2 on some CPUs (3.1e-5 measured on an AMD EPYC, 1.1e-4 at the
    # portable kernel pin's SSE2 GEMMs); a wrong chunking (a row lost or counted twice) moves weights by the order
    # of the learning rate, 1e-2
    assert torch.allclose(results[0], results[1], atol=5e-4)

"""Online token weighting: each method's weights against a plain per-token loop on a tiny random Llama, the
weighted step loss exact across micro-batch splits, the offline path untouched, and the per-token record."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenclean import online as ol
from tokenclean.artifacts import load_array, save_array
from tokenclean.batching import pack
from tokenclean.cli import main
from tokenclean.data import parse_record
from tokenclean.loss import target_forward, target_nll, token_losses
from tokenclean.online import ONLINE_METHODS, Online, OnlineMethod
from tokenclean.tokenization import load_tokenizer, tokenize_records, tokenizer_fingerprint
from tokenclean.training import TrainConfig, micro_batches, step_schedule, train_model

TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox"), ("Reverse the letters : c a t", "t a c"),
         ("x y z", "Hope this helps ."), ("what", "the lazy dog jumps over 1 2 3"),
         ("Which is larger : 37 or 52 ?", "52 is larger ."), ("hello world", "how are you ? fine")]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def table(tok):
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}") for i, (p, c) in enumerate(TEXTS)]
    return tokenize_records(recs, tok, 64)[0]


def eager_model(directory):
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.set_attn_implementation("eager")
    return model


def brute_force(model, table):
    """Per response token, one sample at a time, no packing: nll, the logits that predicted it, and the
    last layer's head-averaged attention of its own position summed over its sample's prompt positions."""
    nll, logits, attention = {}, {}, {}
    with torch.no_grad():
        for s in range(table.n_samples):
            a, b = table.offsets[s], table.offsets[s + 1]
            ids = torch.from_numpy(table.input_ids[a:b].astype(np.int64))[None]
            out = model(input_ids=ids, output_attentions=True)
            attn = out.attentions[-1][0].mean(0)
            for p in range(1, b - a):
                if table.loss_mask[a + p]:
                    row = out.logits[0, p - 1].float()
                    nll[a + p] = float(-torch.log_softmax(row, -1)[ids[0, p]])
                    logits[a + p] = row.tolist()
                    attention[a + p] = sum(float(attn[p, k]) for k in range(b - a) if not table.loss_mask[a + k])
    return nll, logits, attention


def packed_inputs(model, table, width=64):
    """What the trainer hands a method for one packed micro-batch holding every sample."""
    samples = np.arange(table.n_samples)
    batch = pack(table, samples, width, 0)
    out = target_forward(model, batch["input_ids"], None, batch["target"], position_ids=batch["position_ids"],
                         logits=True, attention=True)
    index = batch["index"][batch["target"]].numpy()
    cells = batch["index"].numpy()
    prompt = torch.from_numpy((cells >= 0) & ~table.loss_mask[np.maximum(cells, 0)])
    return {"nll": out["nll"].detach(), "logits": out["logits"], "index": index,
            "sample": torch.from_numpy(np.searchsorted(table.offsets, index, side="right") - 1),
            "prompt_attention": ol.prompt_attention(out["attention"], prompt, batch["target"])}


def top_by_loop(scores: list[float], k: int) -> list[float]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = [0.0] * len(scores)
    for i in order[:k]:
        keep[i] = 1.0
    return keep


def test_each_weight_formula_matches_a_per_token_loop_on_a_packed_batch(tiny_model_dir, table):
    model = eager_model(tiny_model_dir)
    nll, logits, attention = brute_force(model, table)
    got = packed_inputs(model, table)
    index = got["index"].tolist()
    assert sorted(index) == sorted(nll)
    # the quantities themselves, token by token
    assert np.allclose(got["nll"].numpy(), [nll[i] for i in index], atol=1e-5)
    assert np.allclose(got["prompt_attention"].numpy(), [attention[i] for i in index], atol=1e-5)
    assert got["prompt_attention"].min() > 0 and got["prompt_attention"].max() < 1

    # DFT: exp(-nll)
    assert np.allclose(ol.dft(got["nll"]).numpy(), [math.exp(-nll[i]) for i in index], atol=1e-5)

    # EAFT: (entropy of the softmax over the 20 largest logits / 3) ** alpha
    def eaft_loop(row, alpha):
        top = sorted(row, reverse=True)[:20]
        m = max(top)
        lse = m + math.log(sum(math.exp(v - m) for v in top))
        h = -sum(math.exp(v - lse) * (v - lse) for v in top)
        return (h / 3.0) ** alpha
    for alpha in (1.0, 0.5):
        assert np.allclose(ol.eaft(got["logits"], alpha=alpha).numpy(), [eaft_loop(logits[i], alpha) for i in index],
                           atol=1e-5)

    # Rho-1: the top floor(0.6 n) of the batch by nll - ref
    rng = np.random.default_rng(0)
    ref = rng.normal(3, 1, table.n_tokens).astype(np.float32)
    excess = [nll[i] - float(ref[i]) for i in index]
    want = top_by_loop(excess, math.floor(0.6 * len(index)))
    assert ol.rho1(got["nll"], torch.from_numpy(ref[got["index"]])).tolist() == want

    # ssToken: per sample, top ceil(0.6 n) by gamma * minmax(history - nll) + (1 - gamma) * attention
    base = rng.normal(4, 1, table.n_tokens).astype(np.float32)
    for progress, gamma_used in ((0.5, 0.5), (0.1, 0.0)):  # the first 20% of the run: attention alone
        want = {}
        for s in range(table.n_samples):
            tokens = [i for i in index if table.offsets[s] <= i < table.offsets[s + 1]]
            rel = [float(base[i]) - nll[i] for i in tokens]
            norm = [(r - min(rel)) / (max(rel) - min(rel) + 1e-8) for r in rel]
            score = [gamma_used * n + (1 - gamma_used) * attention[i] for n, i in zip(norm, tokens)]
            want.update(zip(tokens, top_by_loop(score, math.ceil(0.6 * len(tokens)))))
        w = ol.sstoken(got["nll"], torch.from_numpy(base[got["index"]]), got["prompt_attention"], got["sample"],
                       progress=progress)
        assert w.tolist() == [want[i] for i in index]


def test_target_forward_gives_target_nll_exactly(tiny_model_dir, table):
    """The online path computes the same losses as the offline one (the same operations)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = pack(table, np.arange(table.n_samples), 64, 0)
    torch.manual_seed(0)
    a = target_nll(model, batch["input_ids"], None, batch["target"], position_ids=batch["position_ids"])
    b = target_forward(model, batch["input_ids"], None, batch["target"], position_ids=batch["position_ids"],
                       logits=True)
    assert torch.equal(a, b["nll"]) and b["logits"].shape == (len(a), model.config.vocab_size)


def _grads(monkeypatch, model, table, cfg, method) -> torch.Tensor:
    """The gradient the optimizer steps with (captured where the trainer clips it)."""
    seen: list[torch.Tensor] = []
    clip = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm, *args, **kwargs):
        seen.append(torch.cat([p.grad.flatten() for p in params]).clone())
        return clip(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    train_model(model, table, table.loss_mask.copy(), cfg, 0, progress=False, online=method)
    return seen[0]


@pytest.mark.parametrize("name", ["dft", "sstoken", "eaft"])
def test_step_normalisation_gives_the_same_gradient_on_any_micro_batch_split(monkeypatch, tiny_model_dir, table,
                                                                            name):
    base = np.where(table.loss_mask, 4.0, np.nan).astype(np.float32)
    grads = []
    for micro in (8, 2):  # 1 vs 4 micro-batches
        cfg = TrainConfig(steps=1, batch_size=8, micro_batch_size=micro, pack_length=64, lr=1e-3, warmup_ratio=0,
                          shuffle=False, loss_normalization="step")  # given: ssToken's own rule is micro_batch
        method = Online(name, ol.resolve(name, None), {"base_loss": base})
        grads.append(_grads(monkeypatch, AutoModelForCausalLM.from_pretrained(tiny_model_dir), table, cfg, method))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalization", ["step", "micro_batch"])
def test_the_logged_loss_is_the_weighted_mean_of_the_methods_normaliser(tiny_model_dir, table, tok, tmp_path,
                                                                        normalization):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = token_losses(copy.deepcopy(model), table, pad_id=tok.pad_token_id, progress=False)
    cfg = TrainConfig(steps=1, batch_size=8, micro_batch_size=2, lr=1e-9, warmup_ratio=0, shuffle=False,
                      loss_normalization=normalization)
    log = tmp_path / "log.jsonl"
    train_model(model, table, table.loss_mask.copy(), cfg, tok.pad_token_id, log_path=log, progress=False,
                online=Online("dft", {}))
    parts = []  # per micro-batch: (sum of p * nll, its token count)
    for chunk in micro_batches(np.arange(8), cfg):
        losses = np.concatenate([before[table.offsets[s]:table.offsets[s + 1]][
            table.loss_mask[table.offsets[s]:table.offsets[s + 1]]] for s in chunk]).astype(np.float64)
        parts.append(((np.exp(-losses) * losses).sum(), len(losses)))
    expected = (sum(p for p, _ in parts) / sum(n for _, n in parts) if normalization == "step"
                else np.mean([p / n for p, n in parts]))
    assert json.loads(log.read_text().splitlines()[0])["loss"] == pytest.approx(expected, abs=1e-5)


def test_without_an_online_method_training_is_unchanged_and_unit_weights_give_plain_sft(monkeypatch, tiny_model_dir,
                                                                                       table):
    monkeypatch.setitem(ONLINE_METHODS, "ones", OnlineMethod(lambda nll: torch.ones_like(nll), {}, ("nll",)))
    cfg = TrainConfig(steps=3, batch_size=4, micro_batch_size=2, pack_length=64, lr=1e-2, warmup_ratio=0, seed=1)
    runs = {}
    for name in (None, "ones"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        method = Online(name, {}) if name else None
        model, summary = train_model(model, table, table.loss_mask.copy(), cfg, 0, progress=False, online=method)
        runs[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert ("online" in summary) == (name is not None)
    assert torch.allclose(runs[None], runs["ones"], atol=1e-4)  # float noise, amplified a little by Adam


def _tokens_file(tmp_path, tok, table):
    path = tmp_path / "d.tokens.npz"
    meta = table.save(path, {"tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    return path, meta


def test_the_weights_artifact_averages_each_tokens_weights_over_two_epochs(monkeypatch, tmp_path, tiny_model_dir,
                                                                          tok, table):
    """A test method echoes the token's own array value plus the run's progress: the record must hold, per
    token, its value plus the mean progress of the two steps that trained its sample; NaN where never trained."""
    monkeypatch.setitem(ONLINE_METHODS, "echo", OnlineMethod(
        lambda ref_loss, progress: ref_loss + progress, {}, ("ref_loss", "progress"), arrays=("ref_loss",)))
    tokens, tmeta = _tokens_file(tmp_path, tok, table)
    mask = table.loss_mask.copy()
    mask[table.offsets[2]:table.offsets[3]] = False  # sample 2 is never trained
    made_on = {"tokens": str(tokens), "tokens_fingerprint": tmeta["fingerprint"]}
    save_array(tmp_path / "m.mask.npy", mask, {"kind": "mask", **made_on})
    ref = np.where(table.loss_mask, np.arange(table.n_tokens) / 100, np.nan).astype(np.float32)
    save_array(tmp_path / "r.loss.npy", ref, {"kind": "loss", **made_on})
    out = tmp_path / "model"
    assert main(["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--mask",
                 str(tmp_path / "m.mask.npy"), "--online", "echo", "--ref-loss", str(tmp_path / "r.loss.npy"),
                 "--steps", "0", "--epochs", "2",
                 "--batch-size", "3", "--micro-batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    weights, meta = load_array(out / "weights.npy", "weights", made_on=(tokens, tmeta, table))
    assert weights.shape == (table.n_tokens,) and meta["method"] == "echo" and meta["tokens_trained"] == mask.sum()
    assert np.all(np.isnan(weights[~mask])) and np.all(np.isfinite(weights[mask]))
    usable = np.flatnonzero(np.add.reduceat(mask.astype(int), table.offsets[:-1]) > 0)
    cfg = TrainConfig(steps=0, epochs=2, batch_size=3)
    schedule = step_schedule(len(usable), cfg)
    passes: dict[int, list[float]] = {}
    for step, picked in enumerate(schedule):
        for s in usable[picked]:
            passes.setdefault(int(s), []).append(step / len(schedule))
    for s, progress in passes.items():
        assert len(progress) == 2
        a, b = table.offsets[s], table.offsets[s + 1]
        keep = mask[a:b]
        assert np.allclose(weights[a:b][keep], ref[a:b][keep] + np.mean(progress), rtol=1e-6, atol=1e-5)
    assert np.isfinite(weights).sum() == mask.sum()
    info = json.loads((out / "tokenclean.json").read_text())
    assert info["online"]["method"] == "echo"


@pytest.mark.parametrize("flags,expected", [
    (["--online", "rho1", "--online-params", '{"ratio": 0.5, "foo": 1}'],
     "unknown parameter 'foo' of online method rho1"),
    (["--online", "rho1"], "--online rho1 needs --ref-loss"),
    (["--online", "sstoken"], "--online sstoken needs --base-loss"),
    (["--online", "rho2"], "--online: unknown method 'rho2'"),
    (["--online", "dft", "--online-params", '{"ratio": 0.5}'],
     "unknown parameter 'ratio' of online method dft (known: none)"),
    (["--online", "eaft", "--online-params", '{"alpha": -1}'], "eaft: alpha must be >= 0"),
    (["--online", "eaft", "--online-params", '{"top_k": 2.5}'], "top_k of eaft must be a int"),
    (["--online-params", '{"ratio": 0.5}'], "--online-params: given without --online"),
])
def test_bad_online_settings_are_a_one_line_error_before_anything_is_written(tmp_path, capsys, tiny_model_dir, tok,
                                                                            table, flags, expected):
    tokens, _ = _tokens_file(tmp_path, tok, table)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--steps", "1", *flags,
                 "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tokenclean train: error: ") and expected in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_online_array_made_on_other_tokens_is_refused(tmp_path, capsys, tiny_model_dir, tok, table):
    tokens, _ = _tokens_file(tmp_path, tok, table)
    bad = tmp_path / "r.loss.npy"
    save_array(bad, np.ones(table.n_tokens, np.float32), {"kind": "loss", "tokens": "other", "tokens_fingerprint": "x"})
    code = main(["train", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--steps", "1", "--online", "rho1",
                 "--ref-loss", str(bad), "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{bad}: made on other" in err[0] and not (tmp_path / "model").exists()


@pytest.mark.parametrize("name, params", [("rho1", {"ratio": 0.5}), ("sstoken", {"ratio": 0.5})])
def test_an_online_run_killed_mid_run_resumes_to_the_uninterrupted_weights_and_record(tiny_model_dir, table, tok,
                                                                                       tmp_path, name, params):
    """The record of what each token received survives a kill: the resumed run ends with the weights and the
    per-token record of a run never interrupted (ssToken: its attention-only phase depends on the step)."""
    from tokenclean.training import TrainingInterrupted

    rng = np.random.default_rng(4)
    loss = np.where(table.loss_mask, rng.random(table.n_tokens) * 3, np.nan).astype(np.float32)
    arrays = {"ref_loss": loss} if name == "rho1" else {"base_loss": loss}
    cfg = TrainConfig(steps=6, batch_size=3, lr=1e-2, warmup_ratio=0.2, seed=5, checkpoint_every=2)

    def run(checkpoints, stop_after=None):
        online = Online(name, ol.resolve(name, params), arrays)
        model = eager_model(tiny_model_dir)
        model, _ = train_model(model, table, table.loss_mask.copy(), cfg, tok.pad_token_id, progress=False,
                               checkpoint_dir=checkpoints, stop_after=stop_after, online=online)
        return model, online.token_weights()

    straight, record = run(tmp_path / "a")
    with pytest.raises(TrainingInterrupted):  # killed after step 3: the last checkpoint is from step 2
        run(tmp_path / "b", stop_after=3)
    resumed, resumed_record = run(tmp_path / "b")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert np.array_equal(np.isnan(record), np.isnan(resumed_record))
    assert np.allclose(record[np.isfinite(record)], resumed_record[np.isfinite(resumed_record)], atol=1e-6)
    assert np.isfinite(record).sum() > 0


def test_the_config_check_reads_the_online_methods_without_starting_torch():
    """Snakemake plans with tokenclean.config, which checks method_params through tokenclean.online: neither
    may start torch (two seconds per planning, and a light job must not pay for it)."""
    import subprocess
    import sys

    code = ("import sys; import tokenclean.config, tokenclean.online\n"
            "tokenclean.online.resolve('eaft', {'alpha': 0.5})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]

"""Every causal LM family the docs name, as a new user would bring it: tiny random Llama, Mistral, Qwen2, Phi-3,
Gemma and GPT-NeoX models saved with ``save_pretrained`` (sharing the tests' small tokenizer) run tokenizing, the
loss, every selection rule, full fine-tuning with packing, LoRA (all-linear and the family's default) with exactly
the targeted layers changed, every online method, and planning's checks of LoRA targets and attention weights."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tokenclean import lora
from tokenclean import methods as registry
from tokenclean import online as ol
from tokenclean.artifacts import TokenTable, load_array
from tokenclean.batching import collate
from tokenclean.cli import main
from tokenclean.config import ConfigError
from tokenclean.data import parse_record
from tokenclean.loss import target_forward
from tokenclean.preflight import check_plan
from tokenclean.tokenization import load_tokenizer, tokenize_records
from tokenclean.training import TrainConfig, train_model

TEXTS = [("Add 3 and 5 .", "Sure ! The answer is 8 ."), ("hello", "fine thanks and you"),
         ("how are you ?", "the quick brown fox"), ("Reverse the letters : c a t", "t a c"),
         ("x y z", "Hope this helps ."), ("what", "the lazy dog jumps over 1 2 3")]

# (config class, its settings beyond the shared tiny sizes)
FAMILIES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 1}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 1}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 1}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 1}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 1, "head_dim": 16}),
    "gpt_neox": ("GPTNeoXConfig", {}),
}
LAYERS = 2
# One family beyond Llama runs every path in `make test-fast`; the others with the slow tests (a few seconds each)
SOME = [f if f == "gpt_neox" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# every linear layer but the output head, by family (what all-linear, the default, adapts), and peft's default
# targets (`peft-default`; all-linear for Phi-3, which peft has no default for)
LINEAR = {"llama": SEVEN, "mistral": SEVEN, "qwen2": SEVEN, "gemma": SEVEN,
          "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
          "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}
DEFAULT = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
           "gemma": ["q_proj", "v_proj"], "phi3": LINEAR["phi3"], "gpt_neox": ["query_key_value"]}


def make_family(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random model of family ``name`` with the tests' tokenizer, saved as a user would save one."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cls, extra = FAMILIES[name]
    config = getattr(transformers, cls)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def families(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: make_family(name, tiny_tokenizer_dir, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def table(tiny_tokenizer_dir) -> TokenTable:
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    recs = [parse_record({"prompt": p, "completion": c}, f"x:{i}") for i, (p, c) in enumerate(TEXTS)]
    return tokenize_records(recs, tok, 64)[0]


def tokens_file(tmp_path: Path, model_dir: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TEXTS))
    tokens = tmp_path / "d.tokens.npz"
    assert main(["tokenize", "--data", str(data), "--tokenizer", str(model_dir), "--max-length", "64",
                 "--out", str(tokens)]) == 0
    return tokens


def module_of(parameter: str) -> str:
    return parameter.rsplit(".", 1)[0]


def changed_modules(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    """The modules of ``after`` any of whose parameters differ from ``before``'s (same names, same shapes)."""
    old = dict(before.named_parameters())
    return {module_of(n) for n, p in after.named_parameters() if not torch.equal(p, old[n])}


@pytest.mark.parametrize("family", SOME)
def test_tokenize_loss_every_selection_rule_and_packed_full_training(family, families, tmp_path):
    model_dir = families[family]
    tokens = tokens_file(tmp_path, model_dir)
    assert main(["loss", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(tmp_path / "b.loss.npy"),
                 "--device", "cpu"]) == 0
    table, _ = TokenTable.load(tokens)
    base, _ = load_array(tmp_path / "b.loss.npy", "loss")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():  # the alignment contract: our mean over loss_mask is the model's own masked loss
        for s in range(table.n_samples):
            a, b = table.offsets[s], table.offsets[s + 1]
            ids = torch.from_numpy(table.input_ids[a:b].astype(np.int64))[None]
            labels = torch.where(torch.from_numpy(table.loss_mask[a:b])[None], ids, -100)
            own = float(model(input_ids=ids, labels=labels).loss)
            assert np.mean(base[a:b][table.loss_mask[a:b]]) == pytest.approx(own, abs=1e-4)
    out = tmp_path / "full"
    assert main(["train", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--pack-length", "64", "--lr", "0.01", "--device", "cpu"]) == 0  # packing checked
    assert main(["loss", "--model", str(out), "--tokens", str(tokens), "--out", str(tmp_path / "r.loss.npy"),
                 "--device", "cpu"]) == 0
    rules = [m for m in registry.METHODS.values() if m.kind == "mask" and not m.ground_truth]
    assert {m.name for m in rules} >= {"full", "random", "rho", "fixed"}
    for m in rules:
        mask_path = tmp_path / f"{m.name}.mask.npy"
        assert main(["select", "--method", m.name, "--ratio", "0.6", "--seed", "1", "--tokens", str(tokens),
                     "--base-loss", str(tmp_path / "b.loss.npy"), "--ref-loss", str(tmp_path / "r.loss.npy"),
                     "--out", str(mask_path)]) == 0
        mask, _ = load_array(mask_path, "mask")
        assert mask.any() and not np.any(mask & ~table.loss_mask)


@pytest.mark.parametrize("targets", ["all-linear", None, "peft-default"], ids=["all-linear", "unset", "peft-default"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_exactly_the_targeted_layers_and_records_them(family, targets, families, tmp_path):
    """After LoRA training and the merge, every targeted layer's weights changed and no other weight did; the
    record names those layers and their adapter parameters (all-linear: every linear layer but the head)."""
    model_dir = families[family]
    tokens = tokens_file(tmp_path, model_dir)
    out = tmp_path / "lora"
    flags = ["--lora-targets", targets] if targets else []
    assert main(["train", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--lr", "0.01", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
                 "--device", "cpu", *flags]) == 0
    record = json.loads((out / "tokenclean.json").read_text())["lora"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = changed_modules(base, AutoModelForCausalLM.from_pretrained(out))
    expected = DEFAULT[family] if targets == "peft-default" else LINEAR[family]  # unset = all-linear
    assert changed == set(record["modules"])
    assert record["adapted"] == {name: LAYERS for name in sorted(expected)}
    assert record["adapted_modules"] == LAYERS * len(expected)
    named = dict(base.named_modules())
    assert record["adapter_parameters"] == sum(4 * sum(named[m].weight.shape) for m in changed)
    if targets is None:
        assert record["source"] == "all-linear (lora_targets unset)"
    elif targets == "peft-default":
        assert record["source"] == ("all-linear: peft has no default for phi3" if family == "phi3"
                                    else f"peft's default for {family}")


def test_a_misspelt_target_is_one_line_naming_the_model_s_layers(families, tmp_path, capsys):
    tokens = tokens_file(tmp_path, families["gpt_neox"])
    code = main(["train", "--model", str(families["gpt_neox"]), "--tokens", str(tokens), "--out",
                 str(tmp_path / "m"), "--steps", "1", "--lora-r", "4", "--lora-targets", "query_key_valu,dense"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not (tmp_path / "m").exists()
    assert err[0].endswith("lora_targets: query_key_valu matches no layer of this gpt_neox model; its linear layers: "
                           "query_key_value, dense, dense_h_to_4h, dense_4h_to_h (or all-linear)")


def test_an_explicit_list_that_misses_linear_layers_warns_once(families, table, caplog):
    cfg = TrainConfig(steps=1, batch_size=2, lora_r=2, lora_targets="qkv_proj,o_proj")
    with caplog.at_level("WARNING"):
        train_model(AutoModelForCausalLM.from_pretrained(families["phi3"]), table, table.loss_mask.copy(), cfg, 0,
                    progress=False, merge=False)
    lines = [r.getMessage() for r in caplog.records if "untrained" in r.getMessage()]
    assert lines == ["lora_targets leaves linear layers of this model untrained: gate_up_proj, down_proj (add them, "
                     "or use all-linear)"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_attention_read_is_transformers_last_layer_weights(family, families, table):
    model = AutoModelForCausalLM.from_pretrained(families[family])
    model.set_attn_implementation("eager")
    batch = collate(table, np.arange(table.n_samples), 0)
    with torch.no_grad():
        read = target_forward(model, batch["input_ids"], batch["attention_mask"], batch["target"],
                              attention=True)["attention"]
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_attentions=True).attentions[-1]
    assert read.shape == own.shape and torch.allclose(read, own, atol=1e-6)


def test_a_model_that_declares_no_attention_layers_is_read_through_output_attentions(families, table, monkeypatch):
    import tokenclean.loss as loss

    model = AutoModelForCausalLM.from_pretrained(families["gpt_neox"])
    model.set_attn_implementation("eager")
    batch = collate(table, np.arange(3), 0)
    hooked = target_forward(model, batch["input_ids"], batch["attention_mask"], batch["target"], attention=True)
    monkeypatch.setattr(loss, "attention_layers", lambda m: [])
    monkeypatch.setattr(loss, "_accepts_output_attentions", lambda m: True)
    read = target_forward(model, batch["input_ids"], batch["attention_mask"], batch["target"], attention=True)
    assert torch.allclose(read["attention"], hooked["attention"], atol=1e-6)
    assert torch.equal(read["nll"], hooked["nll"])


@pytest.mark.parametrize("family", SOME)
def test_every_online_method_trains_on_every_family(family, families, table):
    rng = np.random.default_rng(0)
    arrays = {key: np.where(table.loss_mask, rng.random(table.n_tokens) * 4, np.nan).astype(np.float32)
              for key in ("ref_loss", "base_loss")}
    cfg = TrainConfig(steps=2, batch_size=4, micro_batch_size=2, pack_length=64, lr=1e-2, warmup_ratio=0)
    for name in ol.ONLINE_METHODS:
        method = ol.Online(name, ol.resolve(name, None), {k: arrays[k] for k in ol.ONLINE_METHODS[name].arrays})
        model = AutoModelForCausalLM.from_pretrained(families[family])
        before = model.config._attn_implementation
        _, summary = train_model(model, table, table.loss_mask.copy(), cfg, 0, progress=False, online=method)
        weights = method.token_weights()
        assert np.isfinite(summary["final_loss"]) and summary["online"]["method"] == name
        assert np.isfinite(weights).sum() == summary["online"]["tokens_trained"] > 0
        assert model.config._attn_implementation == before  # eager only while ssToken trains


def test_the_online_methods_average_as_their_references(table, families):
    """auto: DFT, EAFT and Rho-1 over the whole step's tokens, ssToken per micro-batch; a given rule wins."""
    from tokenclean.training import resolve_normalization

    cfg = TrainConfig()
    rules = {name: resolve_normalization(cfg, ol.Online(name, {})).loss_normalization for name in ol.ONLINE_METHODS}
    assert rules == {"rho1": "step", "sstoken": "micro_batch", "dft": "step", "eaft": "step"}
    assert resolve_normalization(cfg).loss_normalization == "step"
    given = TrainConfig(loss_normalization="step")
    assert resolve_normalization(given, ol.Online("sstoken", {})).loss_normalization == "step"


def test_sstoken_ranks_each_occurrence_of_a_sample_on_its_own(families, table, monkeypatch):
    """A sample twice in one micro-batch (a step that wraps into the next epoch): each copy keeps its own top
    ceil(ratio * n), as the released loop filters each row on its own."""
    from tokenclean import training

    seen = {}
    real = ol.sstoken

    def spy(nll, base_loss, prompt_attention, occurrence, progress, **params):
        seen["occurrence"] = occurrence.clone()
        seen["weights"] = real(nll, base_loss, prompt_attention, occurrence, progress, **params)
        return seen["weights"]
    monkeypatch.setitem(ol.ONLINE_METHODS, "sstoken", dataclasses.replace(ol.ONLINE_METHODS["sstoken"], weigh=spy))
    model = AutoModelForCausalLM.from_pretrained(families["llama"])
    model.set_attn_implementation("eager")
    rng = np.random.default_rng(1)
    base = np.where(table.loss_mask, rng.random(table.n_tokens) * 4, np.nan).astype(np.float32)
    online = ol.Online("sstoken", ol.resolve("sstoken", {"ratio": 0.5}), {"base_loss": base})
    online.weight_sum, online.seen = np.zeros(table.n_tokens), np.zeros(table.n_tokens, dtype=np.int64)
    chunk = np.array([1, 0, 1])  # sample 1 twice
    for packed in (0, 64):
        cfg = TrainConfig(steps=1, batch_size=3, pack_length=packed)
        batch = (training.pack(table, chunk, 64, 0, device="cpu") if packed
                 else training.collate(table, chunk, 0, device="cpu"))
        training._online_loss(training.TrainingForward(model), online, table, chunk, batch, cfg, 1, progress=0.5)
        occurrence, weights = seen["occurrence"].numpy(), seen["weights"].numpy()
        sizes = [int((occurrence == o).sum()) for o in np.unique(occurrence)]
        n = [int(table.loss_mask[table.offsets[s]:table.offsets[s + 1]].sum()) for s in chunk]
        assert sorted(sizes) == sorted(n)  # three occurrences, sample 1's twice
        for o in np.unique(occurrence):
            size = int((occurrence == o).sum())
            assert weights[occurrence == o].sum() == -(-size // 2)  # ceil(0.5 * n) per copy


# --- planning ---------------------------------------------------------------------------------------------------


def planned(tmp_path: Path, model_dir: Path, **train) -> tuple[dict, list[str]]:
    """The paper config on local data and ``model_dir``, with ``train`` settings in both training blocks."""
    from tests.test_preflight import own_data

    config, files = own_data(tmp_path)
    config["base_model"] = {"name": str(model_dir)}
    config["evaluation"]["benchmarks"] = []  # planning's reading of lm-eval's tasks: not these tests' subject
    for block in ("warmup", "sft"):
        for key, value in train.items():
            if value is None:
                config[block]["train"].pop(key, None)
            else:
                config[block]["train"][key] = value
    return config, files


def test_planning_stops_on_a_misspelt_target_and_warns_on_a_partial_list(families, tmp_path):
    config, files = planned(tmp_path, families["gpt_neox"], lora_targets=["query_key_valu", "dense"])
    with pytest.raises(ConfigError, match=r"my\.yaml: warmup\.train\.lora_targets: query_key_valu matches no layer "
                                          r"of this gpt_neox model; its linear layers: query_key_value, dense, "
                                          r"dense_h_to_4h, dense_4h_to_h \(or all-linear\)$"):
        check_plan(config, files)
    config, files = planned(tmp_path, families["gpt_neox"], lora_targets=None)  # all-linear
    assert check_plan(config, files) == []
    config, files = planned(tmp_path, families["gpt_neox"], lora_targets="peft-default")
    assert check_plan(config, files) == []
    config, files = planned(tmp_path, families["gpt_neox"], lora_targets=["peft-default", "dense"])
    with pytest.raises(ConfigError, match=r"peft-default stands alone"):
        check_plan(config, files)
    config, files = planned(tmp_path, families["phi3"], lora_targets="qkv_proj,o_proj")
    assert check_plan(config, files) == [
        f"{b}.train.lora_targets: leaves linear layers of this model untrained: gate_up_proj, down_proj (add them, or "
        "use all-linear)" for b in ("warmup", "sft")]
    config, files = planned(tmp_path, families["phi3"], lora_targets=SEVEN)  # Llama's names on Phi-3
    with pytest.raises(ConfigError, match=r"q_proj, k_proj, v_proj, gate_proj, up_proj match no layer of this phi3"):
        check_plan(config, files)
    assert check_plan(config, files, build_model=False) == []  # a cluster job re-reading the Snakefile


def test_planning_says_when_a_model_returns_no_attention_weights(families, tmp_path):
    from transformers import MambaConfig

    config, files = planned(tmp_path, families["gpt_neox"], lora_targets="all-linear")
    config["methods"] = ["full", "sstoken"]
    check_plan(config, files)  # ssToken runs on GPT-NeoX
    mamba = tmp_path / "mamba"
    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(mamba)
    config["base_model"] = {"name": str(mamba)}
    config["sft"]["train"]["lora_r"] = config["warmup"]["train"]["lora_r"] = 0
    with pytest.raises(ConfigError, match=r"methods\[1\]: sstoken reads the last layer's attention weights, but a "
                                          r"mamba model \(.*mamba\): it returns no attention weights"):
        check_plan(config, files)


def test_lora_targets_given_as_a_list_or_a_string_reach_the_trainer_alike():
    assert lora.flag(["q_proj", "v_proj"]) == lora.flag("q_proj, v_proj") == "q_proj,v_proj"
    assert lora.problem(["all-linear", "q_proj"]) == "all-linear stands alone (it names a whole set of layers)"
    assert lora.problem("q_proj,q_proj") == "q_proj listed twice"
    with pytest.raises(ValueError, match="lora_targets: 'q proj' is no module name"):
        TrainConfig(lora_targets="q proj")


@pytest.mark.slow  # starts Snakemake
def test_snakemake_n_stops_on_a_misspelt_target_in_one_line(families, tmp_path):
    from tests.test_preflight import PAPER, _snakemake

    config, _ = planned(tmp_path, families["gpt_neox"], lora_targets="query_key_valu")
    config["evaluation"]["benchmarks"] = yaml.safe_load(PAPER.read_text())["evaluation"]["benchmarks"]
    config["results_dir"] = "results"
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    proc = _snakemake(tmp_path, "-n", "--configfile", "my.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: my.yaml: warmup.train.lora_targets: query_key_valu matches no layer of this gpt_neox model; "
        "its linear layers: query_key_value, dense, dense_h_to_4h, dense_4h_to_h (or all-linear)")


@pytest.mark.slow  # runs the paper's workflow on a tiny model of each family, from scratch (2-5 minutes each)
@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_the_workflow_runs_on_other_families(family, families, tmp_path):
    """The paper config's path (configs/paper, as tests/test_paper_run.py shrinks it) on a non-Llama base with
    LoRA at the default targets (lora_targets unset: all-linear), with ssToken and DFT rows (each averaging by its
    own rule)."""
    import csv

    from tests.test_paper_run import paper_config, snakemake

    cfg = paper_config(tmp_path, families[family])
    cfg.update(methods=["full", "sstoken", "dft"], seeds=[41])
    cfg["evaluation"]["benchmarks"] = [b for b in cfg["evaluation"]["benchmarks"] if b["task"] == "tc_logiqa"]
    for block in ("warmup", "sft"):
        cfg[block]["train"].pop("lora_targets")
        cfg[block]["train"].update(checkpoint_every=0)
    config = tmp_path / "family.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(tmp_path / "work", config)
    results = tmp_path / "work" / "results" / cfg["experiment"]
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(results.rglob("*.log")))
        pytest.fail(f"workflow failed on {family}:\n{proc.stderr[-4000:]}\n{logs}")
    with open(results / "table.csv") as f:
        rows = [r["method"] for r in csv.DictReader(f)]
    assert {"full", "sstoken", "dft"} <= set(rows)
    record = json.loads((results / "models" / "sft" / "sstoken_r0.6_s41" / "tokenclean.json").read_text())
    assert record["lora"]["adapted"] == {name: LAYERS for name in sorted(LINEAR[family])}
    dft = json.loads((results / "models" / "sft" / "dft_s41" / "tokenclean.json").read_text())
    assert dft["train_config"]["loss_normalization"] == "step"  # DFT's own rule, not sft.train's micro_batch

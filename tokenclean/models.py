"""Model loading, saving and the tiny Llama of the embedded world."""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenclean.artifacts import atomic_dir, fingerprint_bytes


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it (the paper's runs), else fp32 (fp16 training would need loss scaling,
    which the trainer does not do); an explicit bf16 on a GPU without it is a one-line error naming the setting."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32
    chosen = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}[dtype]
    if chosen == torch.bfloat16 and not bf16:
        raise ValueError(f"dtype {dtype}: {torch.cuda.get_device_name(device)} has no bfloat16 support; set dtype "
                         "(train or scoring) to auto or float32")
    return chosen


def peak_memory(device: torch.device) -> dict[str, int]:
    """``{"peak_memory_bytes": torch.cuda.max_memory_allocated}`` of a CUDA device (what a job's outputs record
    for ``make gpu-check``), empty elsewhere."""
    return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device))} if device.type == "cuda" else {}


def require_model_dir(name_or_path: str) -> None:
    """Fail clearly when ``name_or_path`` looks like a local path and is no directory.

    Hub ids are ``name`` or ``org/name``; a path starting with ``.``, ``/`` or ``~``, or with two or more ``/``
    (every workflow path: ``results/<experiment>/models/...``), is local.
    """
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or local.exists()
    if looks_local and local.exists() and not local.is_dir():
        raise FileNotFoundError(f"{name_or_path}: is a file, expected a model directory")
    if looks_local and not local.is_dir():
        raise FileNotFoundError(f"{name_or_path}: model directory not found; run the workflow step that creates it "
                                "or fix the path in the config")


def not_loadable(name_or_path: str, error: BaseException, what: str = "model") -> str:
    """One line for a model (or its tokenizer) that cannot be loaded: usually a hub id without hub access."""
    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    if Path(name_or_path).is_dir():
        return f"{name_or_path}: {what} directory could not be loaded ({reason})"
    return (f"{what} {name_or_path!r} could not be loaded from the Hugging Face hub (offline, no access or no such "
            f"id; {reason}); download it where the hub is reachable and point the config at the copy: "
            f"base_model.name: /path/to/dir")


def hub_commit(name_or_path: str, revision: str | None = None) -> str | None:
    """The commit that ``revision`` (a branch, tag or commit; None = the default branch) of hub model
    ``name_or_path`` points to; None for a local directory.

    Commands resolve it once, load exactly that commit and record it in their outputs: a branch such as
    ``main`` moves, so the id alone does not say which weights or tokenizer made an artifact. Offline, the
    commit comes from the local cache (where the download recorded it).
    """
    from huggingface_hub import resolve_revision
    from huggingface_hub.errors import RevisionResolutionError

    require_model_dir(name_or_path)
    if Path(name_or_path).expanduser().is_dir():
        if revision:
            raise ValueError(f"revision {revision!r} applies to hub ids, but {name_or_path} is a local directory")
        return None
    try:
        return resolve_revision(name_or_path, revision=revision or None).resolved
    except (OSError, ValueError, RevisionResolutionError) as e:
        raise FileNotFoundError(not_loadable(name_or_path, e)) from None


def load_model(name_or_path: str, device: torch.device | str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """Load a causal LM (``revision``: the hub commit to load, see :func:`hub_commit`)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device) if not isinstance(device, torch.device) else device
    require_model_dir(name_or_path)
    pinned = {"revision": revision} if revision else {}
    torch_dtype = pick_dtype(dtype, device)
    # a GPU process loads the weights straight onto its GPU, not first into host memory (eight processes of an
    # 8B model would otherwise hold eight copies in RAM at once)
    placed = {"device_map": {"": device}} if device.type == "cuda" else {}
    with loading(name_or_path):  # checks the recorded checksums first (verify_model_dir)
        # safetensors only: a pickled checkpoint (pytorch_model.bin) is refused rather than unpickled
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code, use_safetensors=True,
                                                     **pinned, **placed)
    require_finite_weights(model, name_or_path)
    return model.to(device)


def empty_model(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model built from its config alone with empty weights (torch's meta device): its layers and their
    shapes, no weight read or allocated. What LoRA targets and attention layers are checked on before the weights
    load (and at planning, :mod:`tokenclean.preflight`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    pinned = {"revision": revision} if revision else {}
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **pinned)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def loading(name_or_path: str) -> Iterator[None]:
    """A model that cannot be loaded (missing or unreadable files, a truncated weight file, weights whose shapes do
    not fit its config, no hub access) is one line naming it; other errors (out of memory, ...) pass through. A
    directory made by tokenclean is first checked against its recorded checksums (:func:`verify_model_dir`)."""
    from safetensors import SafetensorError

    verify_model_dir(name_or_path)
    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        raise FileNotFoundError(not_loadable(name_or_path, e)) from None
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise FileNotFoundError(not_loadable(name_or_path, e)) from None


def require_finite_weights(model: Any, name_or_path: str) -> None:
    """Refuse a model with a NaN or infinite weight: every loss and generation it gives would be garbage, and a
    training run on it ends with NaN weights (one pass over the weights, on the device they were loaded to)."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise ValueError(f"{name_or_path}: weight {name} holds NaN or infinite values; the model is broken "
                             "(re-create it, or lower the learning rate that made it)")


def require_ids_fit(model: Any, name_or_path: str, input_ids: Any, tokens: str | os.PathLike) -> None:
    """Every token id of a table must have a row in the model's embedding (a table of another tokenizer may not)."""
    rows = model.get_input_embeddings().num_embeddings
    largest = int(input_ids.max()) if len(input_ids) else -1
    if largest >= rows:
        raise ValueError(f"{tokens}: holds token id {largest}, but {name_or_path} embeds only {rows} ids; tokenize "
                         "the data with this model's tokenizer")


def model_fingerprint(name_or_path: str, commit: str | None = None) -> str:
    """Cheap identity of a model: config and weight-file names and sizes; a hub model is its id and the commit
    loaded (``hub:<id>@<commit>``, see :func:`hub_commit`)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}@{commit}" if commit else f"hub:{name_or_path}"
    parts = []
    for f in sorted(path.iterdir()):
        if f.suffix == ".json" and f.name.startswith("config"):
            parts.append(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            parts.append(f"{f.name}:{f.stat().st_size}".encode())
            with open(f, "rb") as fh:  # the safetensors header and first weights differ between checkpoints
                parts.append(fh.read(1 << 16))
    return fingerprint_bytes(*parts)


RECORD = "tokenclean.json"  # our provenance file in a model directory, with the sha256 of every other file in it


def write_model_dir(model: Any, tokenizer: Any, directory: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a plain Hugging Face directory (safetensors + tokenizer) and our provenance file into ``directory``.

    The provenance file (written with ``extra``) records the sha256 of every file written before it (``files``):
    :func:`verify_model_dir` checks them before any load, so damaged weights are never loaded as good ones."""
    from tokenclean.artifacts import sha256_file, write_json

    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if extra is not None:
        files = {f.name: sha256_file(f) for f in sorted(Path(directory).iterdir())
                 if f.is_file() and f.name != RECORD and not f.name.startswith(".")}  # not snakemake's own marks
        write_json(Path(directory) / RECORD, {**extra, "files": files})


_verified: dict[tuple[str, tuple[tuple[str, int, int], ...]], None] = {}


def verify_model_dir(name_or_path: str | os.PathLike) -> None:
    """Refuse a model directory made by tokenclean whose files are not those it wrote (cut short, emptied,
    bit-flipped, missing): each is checked against the sha256 recorded in its ``tokenclean.json``. A directory
    without that record (a hub model, one made elsewhere) passes as before. A directory already verified by this
    process, unchanged since (names, sizes, modification times), is not hashed again: a command loads the tokenizer
    and the model, and LoRA's merge the start model again."""
    from tokenclean.artifacts import damaged, read_json, sha256_file

    directory = Path(name_or_path)
    record_path = directory / RECORD
    if not directory.is_dir() or not (record_path.exists() or record_path.is_symlink()):
        return
    record = read_json(record_path, written=True)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):  # older models recorded no checksums
        return
    stamps = tuple((name, *(lambda st: (st.st_size, st.st_mtime_ns))((directory / name).stat()))
                   for name in sorted(files) if (directory / name).is_file())
    key = (str(directory.resolve()), stamps)
    if key in _verified:
        return
    for name, digest in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise damaged(path, f"missing, though {record_path} records it")
        if not path.stat().st_size and digest != hashlib.sha256(b"").hexdigest():
            raise damaged(path, "empty")
        if sha256_file(path) != digest:
            raise damaged(path, f"its sha256 differs from the one {record_path} records")
    _verified[key] = None


def save_model(model: Any, tokenizer: Any, out: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save a Hugging Face model directory atomically (a half-written directory never appears at ``out``)."""
    with atomic_dir(out) as tmp:
        write_model_dir(model, tokenizer, tmp, extra)


def tiny_llama(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, hidden: int = 128, layers: int = 4,
               heads: int = 4, intermediate: int = 512, max_positions: int = 256, seed: int = 0) -> Any:
    """A small Llama (tied embeddings) for the embedded world."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=True,
        rms_norm_eps=1e-5, attention_bias=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)

"""SFT data sources: only SFT records pass, hub data sets are pinned to the commit actually loaded, and
data.json records what was written (no network: the hub is monkeypatched)."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest

from tokenclean.data import DataError
from tokenclean.sources import prepare_data

GOOD = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_a_file_source_refuses_plain_text_records(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps(GOOD) + "\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(DataError) as e:
        prepare_data({"pool": {"path": str(pool)}, "warmup": {"first_of_pool": 1}}, tmp_path / "out")
    assert str(e.value).startswith(f"{pool}:2: neither 'messages' nor 'prompt'/'completion'")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.fixture
def hub(monkeypatch):
    """A fake hub: ``rows`` is the data set; ``calls`` records what was asked for."""
    import datasets
    import huggingface_hub

    state = SimpleNamespace(rows=[GOOD, GOOD], calls=[])

    class FakeApi:
        def dataset_info(self, name, revision=None):
            state.calls.append(("info", name, revision))
            return SimpleNamespace(sha=SHA)

    def fake_load(name, split=None, revision=None):
        state.calls.append(("load", name, split, revision))
        return state.rows

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return state


def test_a_hub_source_loads_and_records_the_resolved_commit(tmp_path, hub):
    hub.rows = [GOOD, {**GOOD, "id": 3},
                {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}]
    meta = prepare_data({"pool": {"hub": "someone/ds", "revision": "main"}, "warmup": {"first_of_pool": 2}},
                        tmp_path / "out")
    assert hub.calls == [("info", "someone/ds", "main"), ("load", "someone/ds", "train", SHA)]
    assert meta["pool"]["source"]["resolved_sha"] == SHA and meta["pool"]["source"]["revision"] == "main"
    on_disk = json.loads((tmp_path / "out" / "data.json").read_text())
    assert on_disk["pool"]["source"]["resolved_sha"] == SHA
    for name in ("pool", "warmup"):
        assert on_disk[name]["sha256"] == hashlib.sha256((tmp_path / "out" / f"{name}.jsonl").read_bytes()).hexdigest()
    assert on_disk["pool"]["empty_messages"] == 2 and on_disk["warmup"]["empty_messages"] == 0
    # the hub's id where a row has one, else the data set and the row
    assert [json.loads(line) for line in (tmp_path / "out" / "pool.jsonl").read_text().splitlines()[:2]] == \
        [{"id": "someone/ds:0", **GOOD}, {"id": "3", **GOOD}]


def test_a_hub_record_with_only_text_is_refused(tmp_path, hub):
    hub.rows = [GOOD, {"text": "plain", "messages": None}]
    with pytest.raises(DataError, match=r"someone/ds\[train\]:1: neither 'messages' nor 'prompt'/'completion'"):
        prepare_data({"pool": {"hub": "someone/ds"}, "warmup": {"first_of_pool": 1}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_is_one_line_naming_the_config_key(tmp_path, monkeypatch):
    import huggingface_hub

    class Offline:
        def dataset_info(self, name, revision=None):
            raise OSError("offline\nmore")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(DataError) as e:
        prepare_data({"pool": {"hub": "someone/ds"}, "warmup": {"first_of_pool": 1}}, tmp_path / "out")
    assert "data.pool: {path:" in str(e.value) and "\n" not in str(e.value)

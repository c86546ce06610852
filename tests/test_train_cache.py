"""data.cache (pmod_bench.train.cache): samples built once are the samples built per access; the key follows the
data file's bytes, the images and the processor, so a changed dataset is never served from a stale cache."""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="module")
def toy_processor():
    from transformers import AutoProcessor

    from pmod_bench.toy.pipeline import SHIPPED

    if not (SHIPPED / "baseline" / "processor_config.json").is_file():
        pytest.skip("no shipped toy checkpoint")
    return AutoProcessor.from_pretrained(str(SHIPPED / "baseline"))


def _dataset(processor, data, **kw):
    from pmod_bench.train.data import LlavaConversationDataset, read_records

    return LlavaConversationDataset(read_records([str(data["sft"])]), processor, image_folder=str(data["images"]),
                                    template=kw.pop("template", "vicuna_v1"), max_length=512, image_aspect_ratio="native", **kw)


def _data(tmp_path, n=6):
    from pmod_bench.toy.data import write_training

    return write_training(tmp_path / "data", n_images=n, turns=2)


def test_cached_samples_are_the_built_ones_and_are_reused(tmp_path, toy_processor):
    from pmod_bench.train.cache import attach_cache

    data = _data(tmp_path)
    records = json.loads(data["sft"].read_text())
    records.append({**records[0], "id": "again"})  # a second conversation about the same image
    data["sft"].write_text(json.dumps(records))
    lazy, cached = _dataset(toy_processor, data), _dataset(toy_processor, data)
    got = attach_cache(cached, [str(data["sft"])], tmp_path / "cache")
    assert not got["loaded"] and got["samples"] == len(records) and os.path.isfile(got["path"])
    for i in range(len(records)):
        a, b = lazy[i], cached[i]
        assert set(a) == set(b) and b["input_ids"].dtype == torch.long
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])), i
    assert cached._prebuilt[0]["pixel_values"] is cached._prebuilt[len(records) - 1]["pixel_values"]  # stored once
    again = _dataset(toy_processor, data)
    assert attach_cache(again, [str(data["sft"])], tmp_path / "cache")["loaded"]
    assert torch.equal(again[2]["labels"], lazy[2]["labels"])


def test_the_key_follows_the_data_the_images_and_the_processor(tmp_path, toy_processor):
    from pmod_bench.train.cache import cache_key

    data = _data(tmp_path)
    files = [str(data["sft"])]
    key = cache_key(_dataset(toy_processor, data), files)
    assert cache_key(_dataset(toy_processor, data), files) == key
    assert cache_key(_dataset(toy_processor, data, template="plain"), files) != key
    img = data["images"] / "images" / "00001.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a touched image
    touched = cache_key(_dataset(toy_processor, data), files)
    assert touched != key
    records = json.loads(data["sft"].read_text())
    records[0]["conversations"][1]["value"] = "purple"  # same size, other bytes
    data["sft"].write_text(json.dumps(records))
    assert cache_key(_dataset(toy_processor, data), files) not in (key, touched)


def test_bad_records_found_before_training(tmp_path, toy_processor, caplog):
    from pmod_bench.train.cache import attach_cache
    from pmod_bench.train.data import BadSampleError

    data = _data(tmp_path)
    (data["images"] / "images" / "00002.png").unlink()
    ds = _dataset(toy_processor, data)
    got = attach_cache(ds, [str(data["sft"])], tmp_path / "cache")
    assert got["bad"] == 1 and ds.known_bad[2]["reason"] == "image file not found"
    assert ds[2]["bad_samples"][0]["index"] == 2  # substituted and reported, as without the cache
    with pytest.raises(BadSampleError, match="record 2"):
        attach_cache(_dataset(toy_processor, data, on_bad_sample="fail"), [str(data["sft"])], tmp_path / "cache2")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    ok = _dataset(toy_processor, data)
    assert attach_cache(ok, [str(data["sft"])], blocked)["samples"] == 5  # trains on without the file
    assert "could not store the training sample cache" in caplog.text

"""Every model resolves to an immutable version at load: a hub commit or a content hash.

The hub-cache tests build the Hugging Face cache layout by hand (`models--org--name/refs/main`
naming a commit, `snapshots/<commit>/` holding the files) from the demo models, and start the
real app offline against it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from service import model_versions
from service.model_versions import CACHE_FILE, content_hash, resolve_version
from service.models import ModelLoadError, load_predict_model
from service.settings import Settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CONTENT_HASH = re.compile(r"^sha256-[0-9a-f]{40}$")
LONG_AGO_NS = 1_600_000_000 * 10**9  # 2020: far outside the racy window


def cache_model(hub_cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """Lay `folder` out in `hub_cache` as huggingface_hub does for `repo_id` at `commit`."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir


def age(folder: Path) -> None:
    for path in folder.rglob("*"):
        os.utime(path, ns=(LONG_AGO_NS, LONG_AGO_NS))


def test_info_and_headers_show_the_hub_commit_and_the_local_content_hash(
    start_server, demo_models, tmp_path
):
    cache_model(tmp_path / "hub", "demo-org/classifier", demo_models["classifier"], COMMIT)
    llm = shutil.copytree(demo_models["llm"], tmp_path / "llm")
    server = start_server(
        PREDICT_MODEL="demo-org/classifier",
        GENERATE_MODEL=str(llm),
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1",
        LOG_LEVEL="INFO",
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get("/info").json()
        predicted = client.post("/predict", json={"text": "which model?"})
        generated = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
        listed = client.get("/v1/models")
        refused = client.post("/generate", json={"prompt": "x", "max_new_tokens": 10**6})
        metrics = client.get("/metrics").text

    assert info["predict"]["revision"] == COMMIT
    assert info["predict"]["requested_revision"] == "main"
    assert info["predict"]["revision_source"] == "hub-cache"
    local_hash = info["generate"]["revision"]
    assert CONTENT_HASH.match(local_hash)
    assert info["generate"]["revision_source"] == "content-hash"
    assert predicted.headers["X-Model-Revision"] == COMMIT == predicted.json()["model_revision"]
    for response in (generated, listed, refused):  # answers and errors alike
        assert response.headers["X-Model-Revision"] == local_hash
    assert refused.status_code == 422
    assert f'revision="{COMMIT}"' in metrics and f'revision="{local_hash}"' in metrics
    assert f"revision {COMMIT} (hub-cache)" in server.log()
    assert f"revision {local_hash} (content-hash)" in server.log()


def test_a_pinned_commit_that_is_not_on_disk_stops_the_start_with_the_reason(
    start_server, demo_models, tmp_path
):
    cache_model(tmp_path / "hub", "demo-org/classifier", demo_models["classifier"], COMMIT)
    server = start_server(
        wait=False,
        PREDICT_MODEL="demo-org/classifier",
        PREDICT_MODEL_REVISION=OTHER_COMMIT,
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1",
    )
    assert server.proc.wait(timeout=120) == 1
    log = server.log()
    assert f"demo-org/classifier@{OTHER_COMMIT} is not on disk" in log
    assert f"holds the commits {COMMIT} (refs: main -> {COMMIT})" in log


def test_a_local_folder_pinned_to_another_content_hash_does_not_load(demo_models, tmp_path):
    folder = shutil.copytree(demo_models["classifier"], tmp_path / "classifier")
    actual = content_hash(folder)
    pinned = "sha256-" + "0" * 40
    settings = Settings(predict_model=str(folder), predict_model_revision=pinned)
    with pytest.raises(ModelLoadError, match=f"pinned revision is '{pinned}', but its files hash"):
        load_predict_model(settings)
    pinned_right = Settings(predict_model=str(folder), predict_model_revision=actual)
    assert load_predict_model(pinned_right).revision == actual


def test_changing_one_byte_of_the_weights_changes_the_content_hash(demo_models, tmp_path):
    folder = shutil.copytree(demo_models["llm"], tmp_path / "llm")
    before = content_hash(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    after = content_hash(folder)
    assert CONTENT_HASH.match(before) and CONTENT_HASH.match(after)
    assert after != before
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert content_hash(folder) == before  # the hash is of the content, not of the mtimes


def test_the_content_hash_is_read_from_beside_the_files_while_none_changed(
    demo_models, tmp_path, monkeypatch
):
    folder = shutil.copytree(demo_models["llm"], tmp_path / "llm")
    age(folder)
    computed = content_hash(folder)
    assert (folder / CACHE_FILE).exists()

    def no_hashing(*args: object) -> str:
        raise AssertionError("hashed again although no file changed")

    monkeypatch.setattr(model_versions, "_hash_files", no_hashing)
    assert content_hash(folder) == computed
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(AssertionError, match="hashed again"):
        content_hash(folder)


def test_a_folder_that_cannot_be_written_keeps_its_hash_in_memory(
    demo_models, tmp_path, monkeypatch
):
    # Without the hash an earlier load may have cached beside the demo model's files.
    folder = shutil.copytree(
        demo_models["classifier"],
        tmp_path / "classifier",
        ignore=shutil.ignore_patterns(CACHE_FILE),
    )

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(model_versions.os, "replace", read_only)
    version = resolve_version(str(folder), "main", tmp_path / "no-hub-cache")
    assert version is not None and CONTENT_HASH.match(version.revision)
    assert not (folder / CACHE_FILE).exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_hidden_files_are_not_part_of_the_content_hash(demo_models, tmp_path):
    folder = shutil.copytree(demo_models["classifier"], tmp_path / "classifier")
    before = content_hash(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("huggingface-cli --local-dir leaves these")
    assert content_hash(folder) == before
    (folder / "README.md").write_text("but a visible file is part of the model folder")
    assert content_hash(folder) != before

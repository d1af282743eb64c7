"""What touches the Hugging Face Hub (rmt_peft/hub.py), with the Hub replaced: a repo id told from a
local path, a download that fails named, an upload of a folder as it is, a base model's card found
only where it is already at hand."""
import os

import huggingface_hub
import pytest

from rmt_peft import hub


def test_a_hub_id_is_told_from_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "neo").mkdir()
    assert hub.hub_repo_id("EleutherAI/gpt-neo-125m") == "EleutherAI/gpt-neo-125m"
    assert hub.hub_repo_id("gpt2") == "gpt2"
    for local in ("tiny:gpt_neo", str(tmp_path), "./models/neo", "~/neo", "neo", "a/b/c", "", None):
        assert hub.hub_repo_id(local) is None, local  # "neo" exists here; "a/b/c" is no repo id
    for path in ("neo", "./x", "/x", "~/x", "a/b/c"):
        assert hub.looks_like_path(path), path
    for repo in ("user/model", "gpt2"):
        assert not hub.looks_like_path(repo), repo


def test_a_download_that_fails_is_an_oserror_naming_the_repo(monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(OSError, match=r"^'me/model' is not a local folder and could not be downloaded from the "
                                      r"Hugging Face Hub \(ConnectionError: no network\)$"):
        hub.download("me/model")
    monkeypatch.setattr(hub, "snapshot_download", lambda **kwargs: f"/cache/{kwargs['repo_id']}@{kwargs['revision']}")
    assert hub.download("me/model", revision="v1") == "/cache/me/model@v1"


def test_upload_creates_the_repo_and_sends_the_folder_as_it_is(tmp_path, fake_hub):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "README.md").write_text("card")
    assert hub.upload(str(tmp_path), "me/model", private=True, token="tok") == "commit-info"
    assert fake_hub == [("create_repo", "me/model", True, True, "tok"),
                        ("upload_folder", "me/model", {"a.txt": b"one", "README.md": b"card"}, "model",
                         "Upload rmt-peft model")]
    fake_hub.clear()
    hub.upload(str(tmp_path), "me/model", commit_message="v2")
    assert fake_hub[0][2] is None and fake_hub[1][4] == "v2"


def test_a_base_models_card_is_read_from_its_folder_or_the_cache_never_downloaded(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n")
    assert hub.cached_card(str(tmp_path / "base")) == str(tmp_path / "base" / "README.md")
    assert hub.cached_card(str(tmp_path)) is None  # a folder without a card
    assert hub.cached_card(None) is None and hub.cached_card("tiny:gpt_neo") is None
    asked = []

    def cache(repo_id, filename):
        asked.append((repo_id, filename))
        return str(tmp_path / "base" / "README.md") if repo_id == "me/cached" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    assert hub.cached_card("me/cached") == os.path.join(str(tmp_path), "base", "README.md")
    assert hub.cached_card("me/not-cached") is None
    assert asked == [("me/cached", "README.md"), ("me/not-cached", "README.md")]

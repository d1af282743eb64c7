"""What touches the Hugging Face Hub: telling a repo id from a local path, downloading a saved
model, uploading a folder, and the card of a base model in the local cache (never downloaded).
What a saved folder holds is ``saving.py``'s; ``RMTModel.push_to_hub`` and ``rmt-peft export
--push-to-hub`` check a folder there before uploading it here.
"""
from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

CARD_FILE = "README.md"  # a Hub repo's model card


def looks_like_path(name: str) -> bool:
    """``name`` is meant as a local path, not a Hub id (``user/model``): it exists here, starts like a
    path (``.``, ``/``, ``~``) or has more than one ``/``."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_repo_id(name: str | None) -> str | None:
    """``name`` when it is a valid Hub repo id; None for local paths and models built from a config
    (``tiny:gpt_neo``), which a card's ``base_model`` must not name."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def download(repo_id: str, revision: str | None = None, token: str | None = None) -> str:
    """The local folder of a Hub repo (downloaded to the cache); an OSError says why it is not there."""
    try:
        return snapshot_download(repo_id=repo_id, revision=revision, token=token)
    except Exception as err:
        raise OSError(f"{repo_id!r} is not a local folder and could not be downloaded from the "
                      f"Hugging Face Hub ({type(err).__name__}: {err})") from err


def upload(folder: str, repo_id: str, private: bool | None = None, token: str | None = None,
           commit_message: str | None = None):
    """Create ``repo_id`` (if needed) and upload ``folder`` as it is; returns the commit info."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                             commit_message=commit_message or "Upload rmt-peft model")


def cached_card(base: str | None) -> str | None:
    """The model card of ``base``: a local folder's README.md, or a Hub model's card in the local
    cache (never downloaded); None when there is none here."""
    if not base:
        return None
    path = os.path.join(base, CARD_FILE) if os.path.isdir(base) else None
    if path is None and hub_repo_id(base):
        cached = huggingface_hub.try_to_load_from_cache(base, CARD_FILE)
        path = cached if isinstance(cached, str) else None
    return path if path is not None and os.path.isfile(path) else None

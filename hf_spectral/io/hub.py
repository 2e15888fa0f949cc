"""Pushing a spectral adapter to the Hub with a model card that says what it is.

``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it saves the adapter,
then overwrites the README with a generic transformers card (``library_name: transformers``,
no word of the method or of ``import hf_spectral``). :func:`push_to_hub` saves the adapter,
writes the spectral card (:mod:`hf_spectral.model_card`) and uploads both in one commit.

``import hf_spectral`` also routes ``PeftModel.push_to_hub`` here for models whose adapters are
all spectral (the patch is listed in ``_peft_registry.py``); every other PEFT model keeps
transformers' own push. ``tests/test_hub.py`` checks both routes against a local Hub server.
"""

from __future__ import annotations

import tempfile
from typing import Optional

from .._peft_registry import SPECTRAL_PEFT_TYPE
from .model_card import render_model_card, write_model_card  # noqa: F401  (write_model_card is re-exported)


def is_spectral_model(model) -> bool:
    """True if ``model`` is a PEFT model whose adapters are all spectral."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and bool(configs) and all(
        getattr(c, "peft_type", None) == SPECTRAL_PEFT_TYPE for c in configs.values()
    )


def push_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token=None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    base_model: Optional[str] = None,
    safe_serialization: bool = True,
    **save_kwargs,
):
    """Upload a spectral PeftModel's adapter (config, safetensors, model card) to ``repo_id`` in one commit.

    The arguments are those of transformers' ``push_to_hub``; ``base_model`` overrides the base
    model named in the card (by default the adapter config's ``base_model_name_or_path``), and
    ``save_kwargs`` go to ``save_pretrained`` (``selected_adapters``, ...). An existing README in
    the repo is replaced: the card describes the adapter just pushed. Returns the ``CommitInfo``.
    """
    from huggingface_hub import HfApi, ModelCard

    if not is_spectral_model(model):
        raise ValueError(
            "hf_spectral.hub.push_to_hub uploads PEFT models whose adapters are spectral; this model has "
            f"{type(model).__name__}. Use its own push_to_hub()."
        )
    if not safe_serialization:
        raise ValueError("Spectral adapters are pushed as safetensors only (safe_serialization=True).")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
        path = write_model_card(folder, repo_id=repo_id, base_model=base_model, tags=tags)
        with open(path, encoding="utf-8") as handle:
            ModelCard(handle.read()).validate()  # the Hub's own YAML check, before anything is uploaded
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload spectral adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

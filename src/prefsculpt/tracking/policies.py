"""Resolve ``eval.policy`` to a local Hugging Face folder (safetensors + tokenizer).

Accepted forms:
- ``base``: the configured model itself (``model.name_or_path``);
- a local folder: a Hugging Face model folder, or an MLflow model folder (``MLmodel``) holding one:
  the ``transformers`` flavor the train stage logs keeps the weights in ``model/`` and the tokenizer
  in ``components/tokenizer/`` (put back together here, see :func:`tokenizer_beside`); older
  pyfunc models kept both in ``artifacts/policy``;
- an MLflow run id of a ``train`` run: its local policy folder when this machine trained it,
  else the model the run logged, else its ``policy_delta/`` (``train.log_policy=delta``: the trained
  layers only), assembled once with the base into the cache (:func:`assemble_delta`);
- a folder or ``runs:/`` URI holding a policy delta (``delta.json`` + ``delta.safetensors``): the same;
- an MLflow model URI: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/m-<id>``
  or ``runs:/<run id>/<path>``, downloaded into the cache.
Anything that does not resolve raises :class:`PolicySourceError` naming it (the CLI prints it and
exits with status 2 before any evaluation starts).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow

from prefsculpt.core.files import atomic_dir, json_digest, model_fingerprint
from prefsculpt.core.names import Artifact, Tag
from prefsculpt.models.delta import DeltaError, assemble_policy, find_delta_dir, read_manifest
from prefsculpt.models.loading import ModelSourceError

log = logging.getLogger(__name__)

FORMS = ("base", "a local model folder (or policy delta)", "an MLflow run id of a train run", "models:/<name>@<alias>",
         "models:/<name>/<version>", "runs:/<run id>/<path>")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class PolicySourceError(ModelSourceError):
    """``eval.policy`` does not resolve to a model; the message names it and the accepted forms."""


def _fail(spec: str, why: str) -> PolicySourceError:
    return PolicySourceError(f"eval.policy={spec!r} does not resolve: {why}. Accepted: {', '.join(FORMS)}.")


@dataclass(frozen=True)
class ResolvedPolicy:
    spec: str
    path: Path
    source: str  # base | folder | run | uri
    digest: str
    run_id: str | None = None


def find_hf_folder(root: Path) -> Path | None:
    """``root`` itself if it is a HF model folder, else the shallowest folder under it that is."""
    def ok(d: Path) -> bool:
        return (d / "config.json").is_file() and any(d.glob("*.safetensors"))

    if ok(root):
        return root
    hits = sorted((p.parent for p in root.rglob("config.json") if ok(p.parent)), key=lambda p: len(p.parts))
    return hits[0] if hits else None


def tokenizer_beside(hf: Path) -> Path | None:
    """The tokenizer of an MLflow ``transformers`` model whose weights folder ``hf`` lacks one:
    ``<model root>/components/tokenizer`` beside ``<model root>/model`` (None when ``hf`` has its own
    tokenizer or is not such a layout)."""
    if (hf / "tokenizer_config.json").is_file() or not (hf.parent / "MLmodel").is_file():
        return None
    tok = hf.parent / "components" / "tokenizer"
    return tok if (tok / "tokenizer_config.json").is_file() else None


def _add_tokenizer(hf: Path, tok: Path, link: bool) -> None:
    """Put ``tok``'s files into ``hf`` (never over a file ``hf`` already has)."""
    for f in tok.iterdir():
        if f.is_file() and not (hf / f.name).exists():
            if link:
                (hf / f.name).symlink_to(f.resolve())
            else:
                shutil.copy2(f, hf / f.name)


def _local_mlflow_model(hf: Path, tok: Path, cache: Path) -> Path:
    """A cache folder of links to ``hf``'s weights and ``tok``'s files: the user's folder stays as it is."""
    key = hashlib.sha1(str(hf.resolve()).encode()).hexdigest()[:12]
    target = cache / "evals" / "policies" / f"local-{key}"
    with atomic_dir(target) as tmp:
        for f in hf.iterdir():
            if f.is_file():
                (tmp / f.name).symlink_to(f.resolve())
        _add_tokenizer(tmp, tok, link=True)
    return target


def assemble_delta(delta_dir: Path, base_dir: str | os.PathLike, cache: Path, spec: str | None = None) -> Path:
    """The full policy of the delta at ``delta_dir`` on ``base_dir``: assembled once into
    ``<cache>/evals/policies/delta-<key>``, keyed by the delta's content and the base's fingerprint
    (atomic; a later call reuses it). A base that is not the delta's raises naming both fingerprints."""
    try:
        man = read_manifest(delta_dir)
        target = cache / "evals" / "policies" / f"delta-{json_digest(man.get('sha256'), model_fingerprint(base_dir), length=16)}"
        if (target / "config.json").is_file():
            return target
        return assemble_policy(delta_dir, base_dir, target)
    except DeltaError as exc:
        if spec is None:
            raise
        raise _fail(spec, str(exc)) from exc


def _download(spec: str, cache: Path, base_dir: str | os.PathLike | None = None) -> Path:
    """Download an MLflow model/artifact URI into ``cache`` atomically; returns the HF folder inside
    (a policy delta in it: the full policy assembled on ``base_dir``)."""
    key = hashlib.sha1(spec.encode()).hexdigest()[:12]
    delta = None
    with atomic_dir(cache / "evals" / "policies" / key) as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(tmp)))
        except Exception as exc:  # MlflowException, OSError: anything means "does not resolve"
            raise _fail(spec, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        hf = find_hf_folder(got)
        if hf is None:
            delta = find_delta_dir(got)
            if delta is None or base_dir is None:
                raise _fail(spec, "it downloaded, but holds no Hugging Face model folder (config.json + *.safetensors)")
            rel = delta.relative_to(tmp)
        else:
            tok = tokenizer_beside(hf)
            if tok is not None:
                _add_tokenizer(hf, tok, link=False)
            rel = hf.relative_to(tmp)
    if delta is not None:
        return assemble_delta(cache / "evals" / "policies" / key / rel, base_dir, cache, spec)
    return cache / "evals" / "policies" / key / rel


def run_has_delta(run_id: str) -> bool:
    """The run logged a policy delta (``train.log_policy=delta``)."""
    try:
        names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, Artifact.POLICY_DELTA)}
    except Exception:
        return False
    return "delta.json" in names


def _from_run(run_id: str, cache: Path, base_dir: str | os.PathLike) -> Path:
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise _fail(run_id, f"no MLflow run with this id at {mlflow.get_tracking_uri()}") from exc
    key = run.data.tags.get(Tag.TRAIN_KEY)
    if key:  # trained on this machine: the policy folder is still in the train cache
        local = cache / "train" / key / "policy"
        if (local / "config.json").is_file():
            return local
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'", output_format="list")
    if models:
        return _download(f"models:/{models[0].model_id}", cache)
    if run_has_delta(run_id):  # train.log_policy=delta: the trained layers against the base
        return _download(f"runs:/{run_id}/{Artifact.POLICY_DELTA}", cache, base_dir)
    raise _fail(run_id, "the run logged no model and no policy delta (is it a train run that finished with "
                "train.log_policy=full or delta?)")


def resolve_policy(spec: str | None, base_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> ResolvedPolicy:
    """A local HF folder for ``spec`` (see module doc); raises PolicySourceError naming ``spec``."""
    spec = (spec or "base").strip()
    cache = Path(cache_dir)
    if spec == "base":
        path, source, run_id = Path(base_dir), "base", None
    elif spec.startswith(("models:/", "runs:/")):
        path, source, run_id = _download(spec, cache, base_dir), "uri", None
    elif Path(spec).expanduser().is_dir():
        found = find_hf_folder(Path(spec).expanduser())
        delta = find_delta_dir(Path(spec).expanduser()) if found is None else None
        if delta is not None:
            found, tok = assemble_delta(delta, base_dir, cache, spec), None
        elif found is None:
            raise _fail(spec, "the folder holds no Hugging Face model (config.json + *.safetensors)")
        else:
            tok = tokenizer_beside(found)
        path, source, run_id = (found if tok is None else _local_mlflow_model(found, tok, cache)), "folder", None
    elif _RUN_ID.match(spec):
        path, source, run_id = _from_run(spec, cache, base_dir), "run", spec
    else:
        raise _fail(spec, "not a folder, a run id or an MLflow model URI")
    log.info("evaluate: policy %s -> %s", spec, path)
    return ResolvedPolicy(spec, path, source, model_fingerprint(path), run_id)

"""The model behind the service: GET /classes, GET /models (from the checkpoint's config.json)."""
from __future__ import annotations

from pathlib import PurePath

from fastapi import APIRouter

from diffusion.spec import STEP_RANGES, request_defaults

from ..catalog import model_info
from ..deps import SettingsDep
from ..schemas import ClassInfo, ClassList, ModelList, ModelOut, SamplerInfo

router = APIRouter(tags=["models"])


def public_provenance(provenance: dict) -> dict:
    """The checkpoint's provenance with its training data named by file name only: the path it was trained from
    is the training machine's folder layout, which the API shows no client (as with its own paths)."""
    if isinstance(provenance.get("dataset"), str):
        provenance = dict(provenance, dataset=PurePath(provenance["dataset"]).name)
    return provenance


@router.get("/classes", response_model=ClassList)
def classes(settings: SettingsDep) -> ClassList:
    """The classes a job may ask for, by index and name."""
    names = model_info(settings.checkpoint).class_names
    return ClassList(classes=[ClassInfo(index=i, name=n) for i, n in enumerate(names)])


@router.get("/models", response_model=ModelList)
def models(settings: SettingsDep) -> ModelList:
    """The checkpoint the worker samples from: config, provenance, weights hash, sampler ranges."""
    info = model_info(settings.checkpoint)
    cfg = info.config
    samplers = {s: SamplerInfo(min_steps=lo, max_steps=min(hi, info.num_timesteps))
                for s, (lo, hi) in STEP_RANGES.items()}
    defaults = request_defaults()
    return ModelList(models=[ModelOut(
        name=info.path.name, sha256=info.sha256, class_names=list(info.class_names), unet=cfg.get("unet", {}),
        schedule=cfg.get("schedule", {}), provenance=public_provenance(cfg.get("provenance", {})),
        format_version=cfg.get("format_version"), samplers=samplers, defaults=defaults)])

"""A job's files: grid, single images, zip, manifest; served only from the job's own folder."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from worker.jobs import SUCCEEDED

from ..deps import JobDep, SettingsDep

router = APIRouter(prefix="/jobs/{job_id}", tags=["files"])
_NOT_THERE = {404: {"description": "no such job, or the file is not written yet"}}


def job_file(settings: SettingsDep, job: dict, relative: str) -> Path:
    """``<data dir>/jobs/<id>/<relative>``, resolved; 404 unless it is a file inside that folder."""
    folder = (settings.jobs_dir / job["id"]).resolve()
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise HTTPException(404, f"{relative} is not available (job {job['status']})")
    return path


def _final(settings: SettingsDep, job: dict, relative: str) -> Path:
    """A file written at the end of the job: only once the job succeeded."""
    if job["status"] != SUCCEEDED:
        raise HTTPException(404, f"{relative} is not available (job {job['status']})")
    return job_file(settings, job, relative)


@router.get("/grid.png", response_class=FileResponse, responses={**_NOT_THERE, 200: {"content": {"image/png": {}}}})
def grid(job: JobDep, settings: SettingsDep) -> FileResponse:
    """PNG grid: one row per requested class, up to 10 images each."""
    return FileResponse(_final(settings, job, "grid.png"), media_type="image/png")


@router.get("/images/{i:int}.png", response_class=FileResponse,
            responses={**_NOT_THERE, 200: {"content": {"image/png": {}}}})
def image(job: JobDep, settings: SettingsDep, i: int) -> FileResponse:
    """Image ``i`` (0-based, in request order), as soon as its batch is written."""
    if not 0 <= i < job["images_total"]:
        raise HTTPException(404, f"image {i} out of range 0..{job['images_total'] - 1}")
    return FileResponse(job_file(settings, job, f"images/{i:05d}.png"), media_type="image/png")


@router.get("/images.zip", response_class=FileResponse,
            responses={**_NOT_THERE, 200: {"content": {"application/zip": {}}}})
def images_zip(job: JobDep, settings: SettingsDep) -> FileResponse:
    """Every image of the job (and the grid) in one zip."""
    return FileResponse(_final(settings, job, "images.zip"), media_type="application/zip",
                        filename=f"dreamdata-{job['id']}.zip")


@router.get("/manifest.json", response_class=FileResponse,
            responses={**_NOT_THERE, 200: {"content": {"application/json": {}}}})
def manifest(job: JobDep, settings: SettingsDep) -> FileResponse:
    """One entry per image: file, class, seed, sampler settings; plus the checkpoint hash."""
    return FileResponse(_final(settings, job, "manifest.json"), media_type="application/json")

"""A job's files, served only from the job's own folder.

Generation: grid, single images, zip, manifest. Evaluation: report.json, report.md and the plots
that the worker recorded in the job (``output.plots``), nothing else from the folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.convertors import Convertor, register_url_convertor

from worker.jobs import EVALUATION, SUCCEEDED

from ..deps import JobDep, SettingsDep


class ImageIndex(Convertor):
    """An image index in a URL: 1 to 9 digits (a job holds at most ``DREAMDATA_MAX_N`` images). A longer one
    matches no route, a 404; the ``int`` converter handed it to ``int()``, which refuses over 4,300 digits (a 500)."""
    regex = "[0-9]{1,9}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("image_index", ImageIndex())

router = APIRouter(prefix="/jobs/{job_id}", tags=["files"])
_NOT_THERE = {404: {"description": "no such job, or the file is not written yet"}}


def job_file(settings: SettingsDep, job: dict, relative: str) -> Path:
    """``<data dir>/jobs/<id>/<relative>``, resolved; 404 unless it is a file inside that folder, and that folder
    is itself in the jobs folder (not a link to another job's folder or anywhere else)."""
    jobs = settings.jobs_dir.resolve()
    folder = (jobs / job["id"]).resolve()
    path = (folder / relative).resolve()
    if folder != jobs / job["id"] or not path.is_relative_to(folder) or not path.is_file():
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


@router.get("/images/{i:image_index}.png", response_class=FileResponse,
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


PLOT_NAME = re.compile(r"[a-z0-9_]{1,64}")  # accuracy, per_class, confusion_<arm>: never a path


def _report_file(settings: SettingsDep, job: dict, relative: str) -> Path:
    """A file of a finished evaluation (404 for a generation job)."""
    if job.get("type") != EVALUATION:
        raise HTTPException(404, f"{relative} is not available (not an evaluation job)")
    return _final(settings, job, relative)


@router.get("/report.json", response_class=FileResponse,
            responses={**_NOT_THERE, 200: {"content": {"application/json": {}}}})
def report_json(job: JobDep, settings: SettingsDep) -> FileResponse:
    """An evaluation's full report: per-arm accuracies per seed, confusion matrices, the paired delta."""
    return FileResponse(_report_file(settings, job, "report.json"), media_type="application/json")


@router.get("/report.md", response_class=FileResponse,
            responses={**_NOT_THERE, 200: {"content": {"text/markdown": {}}}})
def report_md(job: JobDep, settings: SettingsDep) -> FileResponse:
    """An evaluation's summary in Markdown (links the plots by file name)."""
    return FileResponse(_report_file(settings, job, "report.md"), media_type="text/markdown; charset=utf-8")


@router.get("/plots/{name}.png", response_class=FileResponse,
            responses={**_NOT_THERE, 200: {"content": {"image/png": {}}}})
def plot(job: JobDep, settings: SettingsDep,
         name: Annotated[str, PathParam(description="a name from the job's output.plots",
                                        openapi_examples={"accuracy": {"value": "accuracy"},
                                                          "confusion": {"value": "confusion_real_synthetic"}})],
         ) -> FileResponse:
    """One plot of an evaluation: accuracy, per_class or confusion_<arm> (real, real_synthetic, synthetic)."""
    plots = (job.get("output") or {}).get("plots") or []
    if not PLOT_NAME.fullmatch(name) or name not in plots:
        raise HTTPException(404, f"no plot {name!r}; this job has {', '.join(plots) or 'none'}")
    return FileResponse(_report_file(settings, job, f"{name}.png"), media_type="image/png")

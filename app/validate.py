"""Turn a /generate or /evaluations request into the worker's input, or 422 errors naming each field.

Errors have FastAPI's own shape, ``{"detail": [{"loc": ["query", "n"], "msg": ..., ...}]}``,
because they are raised as ``RequestValidationError``.
"""
from __future__ import annotations

from typing import Any, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from diffusion.spec import (DEFAULT_SETTINGS, GUIDANCE_RANGE, MAX_SEED, STEP_RANGES, draw_seed, effective_interval,
                            parse_guidance_interval, resolve_class)
from worker.settings import Settings

from .catalog import ModelInfo
from .schemas import EvaluationBody, GenerateBody

DEFAULT_N = 10  # images per class when ?n= is left out (as `dreamdata sample`)


def _error(loc: tuple, msg: str, value: Any, kind: str = "value_error") -> dict:
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def check_query(request: Request, allowed: Sequence[str]) -> None:
    """422 for a query parameter the route does not take (a typo such as ``stpes=3`` would otherwise run with
    the default) or one given twice (``n=5&n=10000``: which?), as a JSON body's ``extra="forbid"`` does."""
    errors: list[dict] = []
    seen: set[str] = set()
    for name, value in request.query_params.multi_items():
        if name in seen:
            if name in allowed:
                errors.append(_error(("query", name), "given more than once; give it once", value))
        elif name not in allowed:
            msg = (f"unknown query parameter; expected one of: {', '.join(allowed)}" if allowed else
                   "this route takes no query parameters; send the settings as a JSON body")
            errors.append(_error(("query", name), msg, value, "extra_forbidden"))
        seen.add(name)
    if errors:
        raise RequestValidationError(errors)


def resolve_request(query: dict, body: GenerateBody | None, info: ModelInfo, settings: Settings) -> dict:
    """-> {"classes": {name: n}, "sampler", "steps", "guidance", "guidance_interval" ([lo, hi] or None), "spacing",
    "seed", "seed_drawn"}; raises RequestValidationError.

    ``query``: {"class", "n", "sampler", "steps", "guidance", "guidance_interval", "spacing", "seed"}, None where not
    given.
    """
    names = info.class_names
    errors: list[dict] = []
    if body is not None:
        src = "body"
        errors += [_error(("query", k), "give either a JSON body or query parameters, not both", v)
                   for k, v in query.items() if v is not None]
        specs = [(("body", "classes", k), ("body", "classes", k), k, v) for k, v in body.classes.items()]
        sampler, steps, guidance, seed, spacing = body.sampler, body.steps, body.guidance, body.seed, body.spacing
        interval = body.guidance_interval  # parsed by the schema
    else:
        src = "query"
        cls, per = query["class"], DEFAULT_N if query["n"] is None else query["n"]
        if cls is None:
            errors.append(_error(("query", "class"), "Field required", None, "missing"))
        keys = list(names) if cls is not None and cls.strip().lower() == "all" else [cls] * (cls is not None)
        specs = [(("query", "class"), ("query", "n"), k, per) for k in keys]
        sampler = query["sampler"] or DEFAULT_SETTINGS.sampler
        steps = DEFAULT_SETTINGS.steps if query["steps"] is None else query["steps"]
        guidance = DEFAULT_SETTINGS.guidance if query["guidance"] is None else query["guidance"]
        seed = query["seed"]
        spacing = query["spacing"] or DEFAULT_SETTINGS.spacing  # a name FastAPI checked against Spacing
        interval = DEFAULT_SETTINGS.guidance_interval
        if query["guidance_interval"] is not None:
            try:
                interval = parse_guidance_interval(query["guidance_interval"])
            except ValueError as e:
                errors.append(_error(("query", "guidance_interval"), str(e), query["guidance_interval"]))

    counts: dict[str, int] = {}
    for class_loc, n_loc, key, n in specs:
        try:
            name = names[resolve_class(key, names)]
        except ValueError as e:
            errors.append(_error(class_loc, str(e), key))
            continue
        if name in counts:
            errors.append(_error(class_loc, f"class {name!r} is given twice", key))
        elif not 1 <= n <= settings.max_n:
            errors.append(_error(n_loc, f"images per class must be in 1..{settings.max_n}", n))
        counts[name] = n
    total = sum(counts.values())
    if total > settings.max_n and not errors:
        loc = ("body", "classes") if body is not None else ("query", "n")
        errors.append(_error(loc, f"{total} images in all; at most {settings.max_n} per job", total))
    errors += _steps_errors((src, "steps"), sampler, steps, info)
    g_lo, g_hi = GUIDANCE_RANGE
    if not g_lo <= guidance <= g_hi:
        errors.append(_error((src, "guidance"), f"guidance must be in {g_lo:g}..{g_hi:g}", guidance))
    if seed is not None and not 0 <= seed <= MAX_SEED:
        errors.append(_error((src, "seed"), f"seed must be in 0..{MAX_SEED}", seed))
    if errors:
        raise RequestValidationError(errors)
    interval = effective_interval(guidance, interval)  # unguided: no interval recorded as if it applied
    return {"classes": counts, "sampler": sampler, "steps": steps, "guidance": float(guidance),
            "guidance_interval": None if interval is None else list(interval), "spacing": spacing,
            "seed": draw_seed() if seed is None else seed, "seed_drawn": seed is None}


def _steps_errors(loc: tuple, sampler: str, steps: int, info: ModelInfo) -> list[dict]:
    """The sampler's step range (diffusion.spec), capped at the checkpoint's schedule length."""
    lo, hi = STEP_RANGES[sampler]
    hi = min(hi, info.num_timesteps)
    return [] if lo <= steps <= hi else [_error(loc, f"steps for sampler {sampler} must be in {lo}..{hi}", steps)]


def resolve_evaluation(body: EvaluationBody, info: ModelInfo) -> dict:
    """-> the worker's input (every field of ``EvaluationBody``); raises RequestValidationError.

    The schema checks each field alone; this adds the rule that needs the sampler and the model.
    """
    errors = _steps_errors(("body", "steps"), body.sampler, body.steps, info)
    if errors:
        raise RequestValidationError(errors)
    resolved = body.model_dump()
    interval = effective_interval(resolved["guidance"], resolved["guidance_interval"])  # unguided: none recorded
    resolved["guidance_interval"] = None if interval is None else list(interval)
    return resolved

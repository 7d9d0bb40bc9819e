"""One router per resource: generate, jobs, job files, models, health."""

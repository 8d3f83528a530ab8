"""Generation jobs and outputs (the zero-shot and job-system issues build them here)."""

"""django-q2 entry points of shot lists (default cluster)."""

from __future__ import annotations

import logging

from alkemy.jobs import JobStatus
from generation.models import GeneratedImage
from shotlists.measure import measure_shot_list
from shotlists.models import ShotList

logger = logging.getLogger(__name__)


def measure_finished_outputs() -> int:
    """Every minute: embed the outputs of shot lists' finished jobs, so a report rarely has to do it while
    its reader waits (it still measures whatever is left). Returns how many outputs were measured."""
    list_ids = (
        GeneratedImage.objects.unscoped()
        .filter(job__shot_job__isnull=False, job__status=JobStatus.SUCCEEDED, shot_output__isnull=True)
        .values_list("job__shot_job__shot_list_id", flat=True)
        .distinct()
    )
    measured = 0
    for shot_list in ShotList.objects.unscoped().filter(pk__in=list(list_ids)).order_by("pk"):
        measured += measure_shot_list(shot_list=shot_list)
    if measured:
        logger.info("measured %s shot list output(s)", measured)
    return measured

"""Each output's face, measured once from the stored image and cached on a `ShotOutput` row.

The report compares outputs with each other (cross-shot consistency), so it needs their embeddings,
not only the score the worker stored. They are computed as `generation.identity.score_image` does:
the job's embedder, the main face of the image (`characters.quality.rank_faces`), cosine similarity
to the character's identity for that embedder as it is when the output is first measured.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from alkemy.jobs import JobStatus
from characters.faces import get_embedder
from characters.models import CharacterIdentity
from characters.quality import rank_faces
from generation.models import GeneratedImage
from shotlists.models import ShotJob, ShotList, ShotOutput

logger = logging.getLogger(__name__)


def _identities(shot_list: ShotList) -> dict[tuple[int, str], np.ndarray]:
    rows = CharacterIdentity.objects.unscoped().filter(
        tenant_id=shot_list.tenant_id, character_id__in=shot_list.character_ids
    )
    return {(row.character_id, row.embedder): np.asarray(row.embedding, dtype=np.float64) for row in rows}


def measure_output(output: GeneratedImage, *, embedder: str, identity: np.ndarray | None) -> dict:
    """The fields of a `ShotOutput` for one stored output image."""
    try:
        with output.file.open("rb") as handle:
            image = Image.open(handle)
            pixels = np.asarray(image.convert("RGB"))
    except Exception:  # a missing or corrupt file must not break the report: it shows as unreadable
        logger.warning("output %s: image unreadable", output.pk, exc_info=True)
        return {"embedding": None, "identity_similarity": None, "reason": "unreadable"}
    faces = get_embedder(embedder).analyze(pixels)
    if not faces:
        return {"embedding": None, "identity_similarity": None, "reason": "no_face"}
    face, _, _ = rank_faces(faces)
    vector = np.asarray(face.embedding, dtype=np.float64)
    vector = vector / np.linalg.norm(vector)
    if identity is None:
        return {"embedding": vector.tolist(), "identity_similarity": None, "reason": "no_identity"}
    similarity = float(np.dot(vector, identity) / np.linalg.norm(identity))
    return {"embedding": vector.tolist(), "identity_similarity": round(similarity, 4), "reason": ""}


def measure_shot_list(*, shot_list: ShotList) -> int:
    """Measure every output of the list's succeeded jobs that has no `ShotOutput` yet. Returns how many."""
    pending = (
        GeneratedImage.objects.unscoped()
        .filter(tenant_id=shot_list.tenant_id, job__shot_job__shot_list=shot_list, job__status=JobStatus.SUCCEEDED,
                shot_output__isnull=True)
        .select_related("job")
        .order_by("pk")
    )  # fmt: skip
    identities = _identities(shot_list)
    links = dict(ShotJob.objects.unscoped().filter(shot_list=shot_list).values_list("job_id", "pk"))
    rows = []
    for output in pending:
        job = output.job
        identity = identities.get((job.character_id, job.embedder))
        rows.append(
            ShotOutput(
                tenant_id=shot_list.tenant_id,
                shot_job_id=links[job.pk],
                output=output,
                embedder=job.embedder,
                **measure_output(output, embedder=job.embedder, identity=identity),
            )  # fmt: skip
        )
    # two readers measuring at once: the first row of each output wins, the other is dropped
    ShotOutput.objects.unscoped().bulk_create(rows, ignore_conflicts=True)
    return len(rows)

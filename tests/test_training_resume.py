"""A training whose worker dies resumes from its last checkpoint on a fresh worker (real `qcluster` processes)."""

import pytest

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from tests import photos
from tests.qcluster import Cluster, wait_for
from tests.test_training_workers import WORKER_ENV, submit, training
from training.models import LoraArtifact
from training.tasks import reap_training_jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def worker_env(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return settings


@pytest.fixture
def eileen(studio_a, worker_env):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def test_a_killed_worker_resumes_from_its_checkpoint_and_ends_at_the_requested_step(api_a, eileen, worker_env):
    steps = 50  # a few seconds of tiny FLUX steps: room to kill the worker between a checkpoint and the end
    cluster = Cluster("gpu", **WORKER_ENV, ALKEMY_TRAINING_CHECKPOINT_STEPS="5").start()
    job_id = submit(api_a, eileen, base_model="flux", steps=steps)
    try:
        wait_for(lambda: training(job_id).checkpoint_step >= 5, timeout=300, what="a first checkpoint")
    finally:
        cluster.kill()
    left_behind = training(job_id)
    assert left_behind.status == JobStatus.RUNNING and 5 <= left_behind.checkpoint_step < steps

    wait_for(lambda: reap_training_jobs()["requeued"] == 1, timeout=30, what="the reaper to re-queue the job")
    assert training(job_id).status == JobStatus.QUEUED

    fresh = Cluster("gpu", **WORKER_ENV, ALKEMY_TRAINING_CHECKPOINT_STEPS="5").start()
    try:
        wait_for(lambda: training(job_id).is_terminal, timeout=400, what="a fresh worker to finish the training")
    finally:
        fresh.stop()
    finished = training(job_id)
    assert finished.status == JobStatus.SUCCEEDED, (finished.error_code, finished.error_message)
    assert finished.attempt == 2
    assert finished.resumed_from_step == left_behind.checkpoint_step  # not from 0
    assert finished.current_step == steps and finished.loss_history[-1][0] == steps
    assert finished.checkpoint_file == ""  # ended: the checkpoint is gone
    artifact = LoraArtifact.objects.unscoped().get(character=eileen)  # exactly one version
    assert artifact.metadata["steps"] == steps and artifact.metadata["resumed_from_step"] == finished.resumed_from_step

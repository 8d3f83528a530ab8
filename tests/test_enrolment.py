"""Enrolment speed-up without losing faces (issue #13): dlib's coarse scan (a 512-px copy first, the full
scan when it finds no subject big enough to trust) finds the same subject as the full scan did, with the
same outcome (accepted / no_face / multiple_faces) and the same embedding, on held-out 1-MP photos:
the sample people scaled up, flipped and darker, pasted small into scenes, and the group photo.
Speed is measured by bench/enrolment.py, not here."""

from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from alkemy.errors import AlkemyError
from characters.faces import get_embedder
from characters.faces.dlib_backend import DETECT_MAX_SIDE
from characters.faces.images import downscale
from characters.quality import pick_subject
from tests import photos


def one_megapixel(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    factor = (1_000_000 / (height * width)) ** 0.5
    return np.asarray(Image.fromarray(pixels).resize((round(width * factor), round(height * factor)), Image.BICUBIC))


def pasted(person: np.ndarray, scene: np.ndarray, width: int) -> np.ndarray:
    scene = one_megapixel(scene).copy()
    small = np.asarray(Image.fromarray(person).resize((width, width * person.shape[0] // person.shape[1])))
    h, w = min(small.shape[0], scene.shape[0] - 100), min(small.shape[1], scene.shape[1] - 150)
    scene[100 : 100 + h, 150 : 150 + w] = small[:h, :w]
    return scene


@lru_cache(maxsize=1)
def held_out() -> dict[str, np.ndarray]:
    from skimage import data

    people = photos.people()
    cases = {f"{name} 1MP": one_megapixel(pixels) for name, pixels in people.items()}
    cases["astronaut flipped"] = np.asarray(ImageOps.mirror(Image.fromarray(cases["astronaut 1MP"])))
    cases["group-3 darker"] = np.asarray(ImageEnhance.Brightness(Image.fromarray(cases["group-3 1MP"])).enhance(0.6))
    for name, width in [("tom-hanks", 260), ("group-0", 260), ("group-2", 380), ("group-5", 560)]:
        cases[f"{name} in a scene, {width} px"] = pasted(people[name], data.coffee(), width)
    cases["group photo"] = one_megapixel(photos.group_photo())
    cases["no face"] = one_megapixel(data.chelsea())
    return cases


def outcome(faces):
    try:
        subject, _ = pick_subject(faces, min_face_px=80)
    except AlkemyError as exc:
        return exc.code, None
    return "accepted", subject


@pytest.mark.parametrize("case", list(held_out()))
def test_coarse_scan_finds_what_the_full_scan_found(case):
    embedder = get_embedder("dlib")
    pixels = held_out()[case]
    (before, old), (after, new) = outcome(embedder.detect_full(pixels)), outcome(embedder.analyze(pixels))
    assert after == before
    if old is not None:
        assert float(old.embedding @ new.embedding) > 0.99  # landmarks and descriptor at the same scale
        assert np.abs(np.array(new.box) - np.array(old.box)).max() < 0.2 * old.side
        assert new.side >= 80 or old.side < 80  # the face_too_small verdict cannot flip either


def test_portraits_take_the_coarse_scan():
    """The speed-up applies where it should: a 1-MP portrait is settled by the 512-px scan alone."""
    embedder = get_embedder("dlib")
    for name in ["tom-hanks 1MP", "group-1 1MP", "group-2 1MP"]:
        small, _ = downscale(held_out()[name], DETECT_MAX_SIDE)
        assert embedder._detect_coarse(small) is not None, name


def test_numpy_and_onnx_resnets_give_dlibs_descriptors():
    """The recogniser run in numpy and in onnxruntime (characters/faces/dlib_resnet.py) equals dlib's own,
    chip by chip; the embedder uses the onnxruntime one (installed with requirements/base.txt)."""
    import dlib

    from characters.faces.dlib_backend import RECOGNISER, models_dir
    from characters.faces.dlib_resnet import FaceRecogniser, OnnxFaceRecogniser

    embedder = get_embedder("dlib")
    assert isinstance(embedder._resnet, OnnxFaceRecogniser)
    ours = [embedder._resnet, FaceRecogniser(models_dir() / RECOGNISER)]
    theirs = dlib.face_recognition_model_v1(str(models_dir() / RECOGNISER))
    for name, pixels in photos.people().items():
        pixels = np.ascontiguousarray(pixels)
        rects, _, _ = embedder._detector.run(pixels, 1, 0.2)
        chip = dlib.get_face_chip(pixels, embedder._predictor(pixels, rects[0]), 150, 0.25)
        expected = np.asarray(theirs.compute_face_descriptor(chip))
        for recogniser in ours:
            assert np.abs(recogniser.descriptor(chip) - expected).max() < 1e-5, (name, type(recogniser).__name__)

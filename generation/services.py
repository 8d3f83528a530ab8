"""Running a method for a character: the synchronous core the job system and `manage.py generate` share."""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from django.conf import settings
from PIL import Image

from alkemy.errors import AlkemyError
from characters.faces import resolve_embedder_name
from characters.models import Character
from generation.identity import IdentityScore, score_images
from generation.methods import method_class
from generation.methods.base import GenerationMethod, GenerationRequest, LoadOptions, StepCallback
from generation.references import character_identity, reference_faces

#: zlib level of the PNGs we store. Level 1 encodes a 1024x1024 output 3-5x faster than Pillow's
#: default 6 (0.16-0.27 s instead of 0.5-1 s on the dev VM) for 13 % more bytes; PNG stays lossless
#: at every level (bench/README-queue-and-methods.md, "GPU-sized job: worker overhead").
PNG_COMPRESS_LEVEL = 1
#: PNG colour types of the modes `encode_png` writes itself (others go through Pillow)
_PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}


def encode_png(image: Image.Image) -> bytes:
    """The lossless PNG bytes of `image`, at `PNG_COMPRESS_LEVEL`.

    8-bit L/RGB/RGBA images (every method's output) are written here: every row with PNG's "Up" filter
    (one vectorised subtraction) and deflated with zlib's run-length strategy. Pillow instead tries all
    five filters on every row to pick one, which is most of its encoding time at level 1; this takes
    about half the CPU for the same size on photos (bench/README-queue-and-methods.md). Both numpy and
    zlib release the GIL while they work. Other modes go through Pillow.
    """
    import struct
    import zlib

    import numpy as np

    color_type = _PNG_COLOR_TYPES.get(image.mode)
    if color_type is None:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    pixels = np.asarray(image, dtype=np.uint8)
    rows = pixels.reshape(image.height, -1)
    filtered = np.empty((image.height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # "Up": each byte minus the one above it (the row above the first is zeros)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    deflate = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = deflate.compress(filtered) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", image.width, image.height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@dataclass
class GeneratedOutput:
    image: Image.Image
    seed: int
    score: IdentityScore
    png: bytes | None = None  # the encoded file, when asked for (`with_png=True`)


def load_method(method: str, *, models_dir: Path | None = None, options: LoadOptions | None = None) -> GenerationMethod:
    try:
        cls = method_class(method)
    except KeyError as exc:
        raise AlkemyError(str(exc.args[0]), code="unknown_method", field="method") from None
    return cls.load(Path(models_dir or settings.ALKEMY_MODELS_DIR), options or LoadOptions.for_device())


def generate_for_character(
    *,
    character: Character,
    method: GenerationMethod,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    needs_references: bool = True,
    with_png: bool = False,
) -> list[GeneratedOutput]:
    """Generate `request.num_images` images, one seed each (seed, seed+1, ...), each identity-scored.

    Images are generated one at a time so that every output is reproducible from its own seed;
    `on_step` sees the steps of all images as one sequence. What the method meters (tokens,
    images) is added up in `request.usage`. A method that carries the identity in its weights
    (a LoRA) runs without reference photos; its outputs are scored when the character has an
    identity, else they say `no_identity`. With `with_png`, each output also carries its PNG
    bytes (`encode_png()`), for a caller that stores them.

    Scoring and PNG encoding run on the CPU, so they are done in two background threads while
    the next image is generated: image i is scored and encoded while image i+1 denoises, and
    after the last image its scoring and encoding run side by side (Pillow's encoder releases
    the GIL). One thread each keeps the face embedder used by one thread at a time, as before.
    A scoring or encoding error fails the call, at the latest once the images are generated.
    If generating fails (a cancel, a timeout) the queued work is dropped and the call waits only
    for what is already running, so that no thread of this call outlives it.
    """
    embedder = resolve_embedder_name()  # scores the outputs
    try:
        # PuLID and InstantID get the references in their weights' embedding space (embedding_space_mismatch if none)
        space = getattr(method, "embedding_space", None)  # stand-ins for a method may lack the attributes
        faces = reference_faces(character=character, embedder=space or embedder, method=getattr(method, "key", ""))
    except AlkemyError:
        if needs_references:
            raise
        faces = []
    try:
        identity = character_identity(character=character, embedder=embedder)
    except AlkemyError:
        identity = None
    count = request.num_images
    pending: list[tuple[Image.Image, int, Future | None, Future | None]] = []
    scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity-score")
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-encode")
    try:
        for index in range(count):
            for _, _, *futures in pending:  # a scoring error stops the job now, not after every image
                for future in futures:
                    if future is not None and future.done():
                        future.result()
            single = replace(request, references=faces, seed=request.seed + index, num_images=1, usage={})

            def step_of_all(step: int, total: int, index: int = index) -> None:
                if on_step is not None:
                    on_step(index * total + step, count * total)

            try:
                image = method.generate(single, step_of_all)[0]
            finally:  # a request that failed may still have been billed (a blocked reply): keep its usage
                for meter, quantity in single.usage.items():
                    if isinstance(quantity, int | float):
                        request.usage[meter] = request.usage.get(meter, 0) + quantity
                    else:  # a label of what was metered (e.g. Gemini's `model`), the same for every image
                        request.usage[meter] = quantity
            score = None if identity is None else scorer.submit(_score, image, identity, embedder)
            png = encoder.submit(encode_png, image) if with_png else None
            pending.append((image, single.seed, score, png))
        outputs = []
        for image, seed, score, png in pending:
            score = score.result() if score is not None else IdentityScore(None, "no_identity")
            outputs.append(GeneratedOutput(image=image, seed=seed, score=score, png=png and png.result()))
        return outputs
    finally:
        scorer.shutdown(wait=True, cancel_futures=True)
        encoder.shutdown(wait=True, cancel_futures=True)


def _score(image: Image.Image, identity, embedder: str) -> IdentityScore:
    return score_images([image], identity=identity, embedder=embedder)[0]

"""From a reference photo to PuLID's EVA-CLIP input: shrink, align to 512x512, parse, keep the grey face.

PuLID's FLUX demo first shrinks the ID photo to a 1024-px long side (`resize_numpy_image_long`,
Lanczos, never enlarging), then detects and aligns with facexlib's `FaceRestoreHelper(face_size=512)`.
We already have the 5 keypoints from the registry's face analysis (in the full-size photo), so we
shrink the photo the same way, move the keypoints with it, and reproduce facexlib's warp: a
similarity transform (rotation, uniform scale, translation) fitted with LMedS to its 512-px FFHQ
template, border filled with the same grey. Warping a large upload straight to 512 px would skip
the Lanczos low-pass and alias.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from generation.pulid.bisenet import BACKGROUND_LABELS, IMAGENET_MEAN, IMAGENET_STD, BiSeNet

ALIGNED_SIZE = 512
#: PuLID's FLUX demo shrinks the ID photo to this long side before detection and alignment
ID_IMAGE_LONG_SIDE = 1024
#: facexlib's standard 5 landmarks of a 512x512 FFHQ face, in insightface's keypoint order
#: (image-left eye, image-right eye, nose tip, left mouth corner, right mouth corner)
FACE_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
#: facexlib's border value is BGR (135, 133, 132) on a BGR image; this is the same grey in RGB
BORDER_RGB = (132, 133, 135)


def limit_long_side(
    image: np.ndarray, keypoints: np.ndarray, long_side: int = ID_IMAGE_LONG_SIDE
) -> tuple[np.ndarray, np.ndarray]:
    """The photo shrunk to `long_side` as PuLID does (Lanczos, sizes truncated), and its keypoints moved along.

    A photo whose long side is already at most `long_side` is returned unchanged. Keypoints are in
    pixel-centre coordinates, which cv2.resize maps as x' = (x + 0.5) * new / old - 0.5.
    """
    height, width = image.shape[:2]
    if max(height, width) <= long_side:
        return image, np.asarray(keypoints, dtype=np.float32)
    factor = long_side / max(height, width)
    new_height, new_width = int(height * factor), int(width * factor)
    resized = cv2.resize(np.ascontiguousarray(image), (new_width, new_height), interpolation=cv2.INTER_LANCZOS4)
    scale = np.array([new_width / width, new_height / height], dtype=np.float64)
    moved = (np.asarray(keypoints, dtype=np.float64).reshape(-1, 2) + 0.5) * scale - 0.5
    return resized, moved.astype(np.float32)


def alignment_matrix(keypoints: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """2x3 similarity transform taking the 5 keypoints onto the template scaled to `size`."""
    template = FACE_TEMPLATE_512 * (size / 512.0)
    # LMedS as facexlib does (it matches skimage's similarity estimate and tolerates one bad point).
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(keypoints, dtype=np.float32).reshape(5, 2), template, method=cv2.LMEDS
    )
    if matrix is None:
        raise ValueError("cannot fit a face alignment to these keypoints")
    return matrix


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """RGB uint8 photo + its 5 keypoints → RGB uint8 (size, size, 3) aligned face."""
    matrix = alignment_matrix(keypoints, size)
    return cv2.warpAffine(
        np.ascontiguousarray(image), matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB
    )


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated over the 3 channels (PuLID hides colour so ID tokens ignore make-up/lighting)."""
    luma = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    return luma.repeat(1, 3, 1, 1)


@torch.no_grad()
def face_features_image(aligned_rgb: np.ndarray, parser: BiSeNet) -> torch.Tensor:
    """Aligned face → (1, 3, H, W) in [0, 1]: the face in grey, everything the parser calls background white."""
    device = next(parser.parameters()).device
    pixels = torch.from_numpy(np.ascontiguousarray(aligned_rgb)).permute(2, 0, 1)[None].float().div(255).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    labels = parser((pixels - mean) / std).argmax(dim=1, keepdim=True)
    background = torch.isin(labels, torch.tensor(BACKGROUND_LABELS, device=device))
    return torch.where(background, torch.ones_like(pixels), to_gray(pixels))


def eva_input(face_image: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    """Resize (bicubic, no antialiasing) and CLIP-normalise for EVA-CLIP.

    PuLID resizes the 512-px tensor with torchvision 0.15.2's `resize(..., BICUBIC)`, which on
    tensors does not antialias (and does not clamp floats): plain bicubic interpolation, which the
    EVA features were computed with.
    """
    resized = F.interpolate(face_image, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(mean, device=face_image.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=face_image.device).view(1, 3, 1, 1)
    return (resized - mean) / std

"""Index sets of MediaPipe's 478-point face mesh (the topology published with the mesh).

"left" and "right" are the subject's, as in MediaPipe: the subject's right eye appears on the
image's left in a frontal photo. Polygons listed as cycles are ordered around the contour.
"""

from __future__ import annotations

NUM_LANDMARKS = 478
NUM_MESH_POINTS = 468  # 0..467 are mesh vertices; 468..477 are the two irises

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67,
             109)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYEBROW = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
RIGHT_EYEBROW = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39,
              40, 185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80,
              191)
NOSE = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327,
        344, 440)
LEFT_IRIS = (474, 475, 476, 477)
RIGHT_IRIS = (469, 470, 471, 472)
LEFT_IRIS_CENTER = 473
RIGHT_IRIS_CENTER = 468
NOSE_TIP = 1
UPPER_LIP_INNER = 13  # the inner lips' midpoints
LOWER_LIP_INNER = 14
MOUTH_RIGHT_CORNER = 61  # subject's right: image left in a frontal photo
MOUTH_LEFT_CORNER = 291

# Five keypoints in the ArcFace/insightface order: image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner (for an upright, frontal face).
FIVE_POINT_INDICES = (RIGHT_IRIS_CENTER, LEFT_IRIS_CENTER, NOSE_TIP, MOUTH_RIGHT_CORNER,
                      MOUTH_LEFT_CORNER)

# Region name -> landmark indices. Regions in CONTOUR_REGIONS are ordered cycles filled as
# polygons; the others (brows, nose) are filled as the convex hull of their points.
REGIONS: dict[str, tuple[int, ...]] = {
    "face": FACE_OVAL,
    "left_eye": LEFT_EYE,
    "right_eye": RIGHT_EYE,
    "left_brow": LEFT_EYEBROW,
    "right_brow": RIGHT_EYEBROW,
    "nose": NOSE,
    "lips": LIPS_OUTER,
    "mouth_inner": LIPS_INNER,
}

CONTOUR_REGIONS = frozenset({"face", "left_eye", "right_eye", "lips", "mouth_inner"})
